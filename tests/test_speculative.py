"""Speculative decoding (engine/serving/speculative.py): the acceptance rule keeps the target's distribution
(statistical tests on a small vocabulary), greedy output is the same token for token with every drafter (the
demo zoo's ryz-demo-m as target, ryz-demo-s as draft model), stops and limits inside an accepted run behave as
without speculation, and the server's field, settings and metrics."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from scipy import stats

from engine.errors import InvalidRequestError
from engine.model.native import NativeModel
from engine.model.quantize import quantize_checkpoint
from engine.model.tokenizer import ModelTokenizer
from engine.serving.core import EngineCore, GenerationRequest
from engine.serving.sampling import Sampler, SamplingParams
from engine.serving.scheduler import SchedulerConfig
from engine.serving.speculative import (
    DraftLength,
    DraftModel,
    PromptLookupDrafter,
    SpecAdapt,
    SpecConfig,
    accept_drafts,
    parse_spec,
    spec_from_settings,
)
from engine.settings import Settings

ZOO = Path(__file__).resolve().parents[1] / "examples" / "zoo"
FLAKE = 1e-7  # each statistical test fails a correct implementation with at most this probability


def _chi2_ok(counts: np.ndarray, probs: np.ndarray) -> tuple[bool, float]:
    """Pearson's chi-square of observed counts against probabilities, at the FLAKE level (empty bins merged away)."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    if keep.sum() == 1:
        return True, 0.0  # one possible token, and only it was drawn
    expected = probs[keep] * n
    stat = float((((counts[keep] - expected) ** 2) / expected).sum())
    return stat < stats.chi2.isf(FLAKE, keep.sum() - 1), stat


# --- the acceptance rule ----------------------------------------------------------------------------------------


def test_acceptance_rule_keeps_the_target_distribution_with_a_sampled_draft():
    rng = np.random.default_rng(1)
    p = np.array([0.30, 0.05, 0.20, 0.0, 0.15, 0.10, 0.12, 0.08])
    q = np.array([0.05, 0.40, 0.10, 0.15, 0.0, 0.10, 0.10, 0.10])
    counts = np.zeros(8)
    accepted = 0
    n = 60_000
    for _ in range(n):
        x = int(rng.choice(8, p=q))
        kept, token = accept_drafts(lambda i: p, [x], rng, lambda i: q)
        first = x if kept else token
        counts[first] += 1
        accepted += kept
    ok, stat = _chi2_ok(counts, p)
    assert ok, (stat, counts / n)
    # the acceptance rate is sum(min(p, q)) (Leviathan et al.)
    rate = np.minimum(p, q).sum()
    assert abs(accepted / n - rate) < 6 * np.sqrt(rate * (1 - rate) / n)


def test_acceptance_rule_with_deterministic_drafts_over_two_positions():
    """A Markov target p(next | previous) over 5 tokens; drafts are fixed guesses (q a point mass). The first two
    tokens emitted after state 0, across as many speculative steps as it takes, follow the target's joint law."""
    rng = np.random.default_rng(2)
    P = np.array(
        [
            [0.10, 0.40, 0.20, 0.20, 0.10],
            [0.50, 0.05, 0.05, 0.30, 0.10],
            [0.25, 0.25, 0.25, 0.0, 0.25],
            [0.02, 0.08, 0.60, 0.20, 0.10],
            [0.30, 0.30, 0.10, 0.10, 0.20],
        ]
    )
    guesses = [1, 3]  # the drafter always proposes these, a common guess and a rarer one
    counts = np.zeros((5, 5))
    n = 50_000
    for _ in range(n):
        out = [0]
        while len(out) < 3:
            base = list(out)
            kept, token = accept_drafts(lambda i: P[([*base, *guesses][len(base) - 1 + i])], guesses, rng)
            out += [*guesses[:kept], token]
        counts[out[1], out[2]] += 1
    joint = P[0][:, None] * P  # P(t1) * P(t2 | t1)
    ok, stat = _chi2_ok(counts.ravel(), joint.ravel())
    assert ok, (stat, counts / n)


def test_greedy_acceptance_is_argmax_agreement():
    p = np.zeros(6)
    p[4] = 1.0
    rng = np.random.default_rng(0)
    assert accept_drafts(lambda i: p, [4, 4, 2, 4], rng) == (2, 4)  # third draft disagrees: the target's token
    assert accept_drafts(lambda i: p, [4, 4], rng) == (2, 4)  # all accepted: the bonus token


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=4),
        SamplingParams(top_p=0.8),
        SamplingParams(min_p=0.2, temperature=0.9),
        SamplingParams(repetition_penalty=1.5, frequency_penalty=0.8, presence_penalty=0.3),
    ],
)
def test_sampler_distribution_is_what_sample_draws(params):
    """Speculation accepts against Sampler.distribution: it must be the law Sampler.sample draws from."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 0.8, 7).astype(np.float32)
    prompt, generated = [1, 2, 2], [2, 5]
    sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": 11}), 7)
    p = sampler.distribution(logits, prompt, generated)
    assert abs(p.sum() - 1) < 1e-9
    counts = np.bincount([sampler.sample(logits, prompt, generated).token for _ in range(20_000)], minlength=7)
    ok, stat = _chi2_ok(counts, p)
    assert ok, (stat, counts, p)
    greedy = Sampler(SamplingParams(temperature=0), 7).distribution(logits, prompt, generated)
    assert greedy[int(np.argmax(logits))] == 1.0 and greedy.sum() == 1.0


def test_prompt_lookup_takes_the_longest_latest_match():
    drafter = PromptLookupDrafter(1, 3)
    assert drafter.propose([5, 6, 7, 8, 9, 1, 6, 7], 3) == [8, 9, 1]  # trigram miss, bigram "6 7" matches
    assert drafter.propose([1, 2, 3, 4, 1, 2, 9, 1, 2], 2) == [9, 1]  # the latest "1 2" with a token after it
    assert drafter.propose([1, 2, 3], 4) == []
    assert PromptLookupDrafter(2, 3).propose([4, 1, 5, 1], 2) == []  # only a unigram matches


def test_request_field_parsing():
    default = SpecConfig("off", 4)
    assert parse_spec(None, default) is default
    assert parse_spec(False, SpecConfig("ngram", 5)).method == "off"
    assert parse_spec(True, default) == SpecConfig("ngram", 4)
    assert parse_spec("draft", default).method == "draft"
    assert parse_spec({"method": "ngram", "num_tokens": 7, "ngram_max": 5}, default) == SpecConfig("ngram", 7, 1, 5)
    for bad in (
        {"method": "magic"},
        {"num_tokens": 0},
        {"num_tokens": 99},
        {"num_tokens": "4"},
        {"k": 3},
        3,
        "replay",
        {"ngram_min": 4, "ngram_max": 2},
    ):
        with pytest.raises(InvalidRequestError) as info:
            parse_spec(bad, default)
        assert info.value.param == "speculative"


def test_settings_validation():
    assert Settings(speculative="ngram", spec_tokens=6).spec_tokens == 6
    for bad in (
        {"speculative": "maybe"},
        {"spec_tokens": 0},
        {"spec_tokens": 17},
        {"spec_ngram_min": 0},
        {"spec_adapt_low": 1.5},
        {"spec_adapt_window": 0},
        {"spec_adapt_probe_every": 0},
    ):
        with pytest.raises(ValueError):
            Settings(**bad)
    # the adaptation policy comes from the settings and requests keep the server's
    server = spec_from_settings(Settings(speculative="ngram", spec_adapt_low=0.2, spec_adapt_probe_every=5))
    assert server.adapt == SpecAdapt(low=0.2, probe_every=5)
    assert parse_spec({"num_tokens": 6}, server).adapt == server.adapt == parse_spec(False, server).adapt


def test_draft_length_policy():
    """k halves after the warm-up while acceptance is low, down to a pause; a paused request probes one token
    every probe_every plain steps and resumes when it is kept; k doubles back while acceptance is high."""
    policy = DraftLength(4, SpecAdapt(warmup=3, window=8, low=0.3, high=0.6, probe_every=5))
    ks = []
    for _ in range(5):  # every draft rejected
        ks.append(policy.next_k())
        policy.verified(ks[-1], 0)
    assert ks == [4, 4, 4, 2, 1] and policy.k == 0 and policy.paused
    for _ in range(5):
        assert policy.next_k() == 0
        policy.plain_step()
    assert policy.next_k() == 1 and not policy.paused  # the probe
    policy.verified(1, 0)  # rejected: paused again for probe_every plain steps
    assert policy.next_k() == 0 and policy.paused
    for _ in range(5):
        policy.plain_step()
    policy.verified(policy.next_k(), 1)  # kept: drafting resumes and k climbs back while drafts are kept
    ks = []
    for _ in range(4):
        ks.append(policy.next_k())
        policy.verified(ks[-1], ks[-1])
    assert ks == [1, 2, 4, 4] and policy.paused_steps == 10
    fixed = DraftLength(4, SpecAdapt(on=False))
    for _ in range(20):
        fixed.verified(4, 0)
    assert fixed.next_k() == 4


# --- the engine on the demo zoo ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for name in ("ryz-demo-m", "ryz-demo-s"):
        out[name] = root / f"{name}.gguf"
        quantize_checkpoint(ZOO / name, out[name])
    return out


@pytest.fixture(scope="module")
def engine(zoo, native_library):
    target = NativeModel(zoo["ryz-demo-m"], native_library, threads=2, max_seqs=4, max_positions=256)
    draft = NativeModel(zoo["ryz-demo-s"], native_library, threads=2, max_seqs=4, max_positions=256)
    tok = ModelTokenizer(target.file)
    core = EngineCore(
        target,
        tok,
        SchedulerConfig(slots=4, max_context=256, prefill_chunk=64, prefix_cache_slots=4),
        draft_model=DraftModel(draft, ModelTokenizer(draft.file), target.hp.vocab, tok),
    )
    yield core, tok
    core.close()


EDIT = "copy k t p z q r : k t p z q r\nmako lives in paris\ncopy k t p z q r :"  # the answer is in the prompt
FREE = ["count up from 7 :", "12 + 5 =", "the cat"]  # drafts mostly rejected


def _run(core, tok, prompts, spec=None, params=None, **kw):
    params = params or SamplingParams(temperature=0)
    specs = spec if isinstance(spec, list) else [spec] * len(prompts)
    return core.run(
        [
            GenerationRequest(tok.encode(p), params, speculative=s, **{"max_tokens": 40, **kw})
            for p, s in zip(prompts, specs)
        ]
    )


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_is_identical_token_for_token(engine, method):
    core, tok = engine
    prompts = [EDIT, *FREE]
    plain = _run(core, tok, prompts, SpecConfig())
    before = dict(core.spec_totals)
    spec = _run(core, tok, prompts, SpecConfig(method, 5))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert [(r.text, r.finish_reason) for r in spec] == [(r.text, r.finish_reason) for r in plain]
    edit, *free = [r.speculative for r in spec]
    rate = lambda runs: sum(r["accepted"] for r in runs) / max(1, sum(r["drafted"] for r in runs))  # noqa: E731
    # drafts get accepted (measured: ngram 0.50, the weak draft model 0.27 at a fixed k; adaptive k pauses the
    # weak one through its rejecting runs, 0.19)
    assert rate([edit]) >= 0.15, edit
    assert sum(f["drafted"] - f["accepted"] for f in free) > 0  # elsewhere many are rejected
    assert core.spec_totals["steps"] > before["steps"]
    # mixed: speculating and plain requests in one batch; then a plain run reusing the slots' prefix KV
    mixed = _run(core, tok, prompts, [SpecConfig(method, 3), None, SpecConfig("ngram", 8), None])
    assert [r.token_ids for r in mixed] == [r.token_ids for r in plain]
    assert [r.token_ids for r in _run(core, tok, prompts, SpecConfig())] == [r.token_ids for r in plain]


def test_stops_and_limits_inside_an_accepted_run(engine):
    """A replay drafter proposing the greedy continuation gets every draft accepted, so max_tokens, a stop string,
    a stop token and EOS all land inside an accepted run: the output must end exactly where plain decoding ends."""
    core, tok = engine
    prompt = EDIT
    full = _run(core, tok, [prompt], SpecConfig(), max_tokens=60)[0]
    replay = SpecConfig("replay", 8, replay=tuple(full.token_ids))
    ids = full.token_ids
    stop_string = tok.decode(ids[5:8])
    cases = [
        {"max_tokens": 6},
        {"max_tokens": 60, "stop": [stop_string]},
        {"max_tokens": 60, "stop_token_ids": {ids[10]}},
        {"max_tokens": 60, "ignore_eos": True},
    ]
    for kw in cases:
        plain = _run(core, tok, [prompt], SpecConfig(), **kw)[0]
        spec = _run(core, tok, [prompt], replay, **kw)[0]
        assert (spec.token_ids, spec.text, spec.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason), kw
        assert spec.speculative["accepted"] == spec.speculative["drafted"] > 0, kw
    # a draft of EOS the target does not agree with is rejected: the output stays greedy decoding's
    eos = next(iter(tok.stop_ids))
    forced = SpecConfig("replay", 8, replay=(*ids[:3], eos, *ids[3:9]))
    assert _run(core, tok, [prompt], forced, max_tokens=30)[0].token_ids == ids[:30]


def _wrong(ids: list[int], vocab: int) -> tuple[int, ...]:
    """A continuation that differs from `ids` at every position: every draft taken from it is rejected."""
    return tuple((t + 1) % vocab for t in ids)


def test_adaptive_k_pauses_a_drafter_that_is_always_wrong(engine):
    core, tok = engine
    kw = {"max_tokens": 60, "ignore_eos": True}
    plain = _run(core, tok, [EDIT], SpecConfig(), **kw)[0]
    wrong = SpecConfig("replay", 4, replay=_wrong(plain.token_ids, core.vocab))
    before = core.spec_totals["paused"]
    spec = _run(core, tok, [EDIT], wrong, **kw)[0]
    assert (spec.token_ids, spec.text) == (plain.token_ids, plain.text)
    meta = spec.speculative
    # warm-up 4 steps x 4 drafts, then k 2 and 1, then a 1-token probe every 16 plain steps: 4 x steps would be ~240
    assert meta["accepted"] == 0 and meta["drafted"] <= 4 * 4 + 2 + 1 + 4, meta
    assert meta["paused"] >= 40 and core.spec_totals["paused"] - before == meta["paused"], meta
    fixed = _run(core, tok, [EDIT], SpecConfig("replay", 4, replay=wrong.replay, adapt=SpecAdapt(on=False)), **kw)[0]
    assert fixed.token_ids == plain.token_ids and fixed.speculative["drafted"] > 200  # without adaptation


def test_adaptive_k_stays_at_its_maximum_while_drafts_are_kept(engine):
    core, tok = engine
    kw = {"max_tokens": 60, "ignore_eos": True}
    plain = _run(core, tok, [EDIT], SpecConfig(), **kw)[0]
    spec = _run(core, tok, [EDIT], SpecConfig("replay", 4, replay=tuple(plain.token_ids)), **kw)[0]
    meta = spec.speculative
    assert spec.token_ids == plain.token_ids
    assert meta["paused"] == 0 and meta["accepted"] == meta["drafted"]
    assert meta["drafted"] >= 4 * (meta["steps"] - 1), meta  # every step but the one capped by max_tokens: k = 4


def test_adaptive_k_gives_drafting_back_when_the_text_starts_repeating(engine):
    """Drafts wrong for the first 16 tokens, right afterwards: drafting pauses, the probe after 16 plain steps is
    kept, and k climbs back to 4."""
    core, tok = engine
    kw = {"max_tokens": 60, "ignore_eos": True}
    ids = _run(core, tok, [EDIT], SpecConfig(), **kw)[0].token_ids
    switch = SpecConfig("replay", 4, replay=(*_wrong(ids[:16], core.vocab), *ids[16:]))
    spec = _run(core, tok, [EDIT], switch, **kw)[0]
    meta = spec.speculative
    assert spec.token_ids == ids
    assert meta["paused"] > 0 and meta["accepted"] >= 20, meta
    assert meta["emitted"] - meta["steps"] == meta["accepted"]  # (each step emits its accepted drafts + 1)


def test_sampled_requests_run_and_are_reproducible(engine):
    core, tok = engine
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, logprobs=2)
    a = _run(core, tok, [EDIT], SpecConfig("ngram", 4), params)[0]
    b = _run(core, tok, [EDIT], SpecConfig("ngram", 4), params)[0]
    assert a.token_ids == b.token_ids and len(a.logprobs) == len(a.token_ids)
    assert all(s.token == t and s.logprob <= 0 and len(s.top) == 2 for s, t in zip(a.logprobs, a.token_ids))


def test_draft_model_with_another_tokenizer_is_refused(engine, tmp_path, native_library):
    from tests import checkpoints

    core, tok = engine
    gguf = tmp_path / "other.gguf"
    quantize_checkpoint(checkpoints.synth(tmp_path / "ckpt"), gguf)  # vocab 512 too, another tokenizer
    other = NativeModel(gguf, native_library, threads=1, max_positions=64)
    try:
        with pytest.raises(ValueError, match="tokenizer"):
            DraftModel(other, ModelTokenizer(other.file), core.vocab, tok)
        with pytest.raises(ValueError, match="vocabulary"):
            DraftModel(other, ModelTokenizer(other.file), core.vocab + 1, tok)
    finally:
        other.close()


# --- the server -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(zoo, native_library, tmp_path_factory):
    from engine.serving.app import create_app
    from engine.serving.client import load_model
    from tests.test_server import RunningServer, _free_port

    root = tmp_path_factory.mktemp("spec-serve")
    settings = Settings(
        home=root / "home",
        store=f"file://{root / 'store'}",
        max_seqs=4,
        max_context=256,
        threads=2,
        prefill_chunk=64,
        spec_draft_model=str(zoo["ryz-demo-s"]),
        spec_tokens=4,
    )
    app = create_app(settings, str(zoo["ryz-demo-m"]), loader=functools.partial(load_model, library=native_library))
    with RunningServer(app, _free_port()) as running:
        yield running


def test_server_field_metadata_and_metrics(server):
    client = server.client()
    kw = dict(model="ryzanstein", prompt=EDIT, max_tokens=30, temperature=0)
    plain = client.completions.create(**kw)
    assert "speculative" not in (plain.choices[0].model_extra or {})  # the server's default is off
    for spec in ({"method": "ngram", "num_tokens": 5}, "draft", True):
        out = client.completions.create(**kw, extra_body={"speculative": spec})
        assert out.choices[0].text == plain.choices[0].text
        meta = out.choices[0].model_extra["speculative"]
        assert meta["steps"] > 0 and 0 < meta["accepted"] <= meta["drafted"] and meta["paused"] >= 0
    chat = client.chat.completions.create(
        model="ryzanstein",
        messages=[{"role": "user", "content": "copy a b c :"}],
        max_tokens=10,
        temperature=0,
        extra_body={"speculative": {"method": "ngram"}},
    )
    assert chat.choices[0].model_extra["speculative"]["method"] == "ngram"
    structured = client.chat.completions.create(
        model="ryzanstein",
        messages=[{"role": "user", "content": "json"}],
        max_tokens=10,
        response_format={"type": "json_object"},
        extra_body={"speculative": "ngram"},
    )
    assert "structured output" in structured.choices[0].model_extra["speculative"]["skipped"]
    for bad in ({"method": "magic"}, {"num_tokens": 0}, "sometimes", 3, {"extra": 1}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**kw, extra_body={"speculative": bad})
        assert info.value.body["param"] == "speculative"
    metrics = httpx.get(f"{server.url}/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("ryz_spec_") and 'variant="production"' in line
    }
    drafted = values['ryz_spec_draft_tokens_total{variant="production"}']
    accepted = values['ryz_spec_accepted_tokens_total{variant="production"}']
    steps = values['ryz_spec_verify_steps_total{variant="production"}']
    emitted = values['ryz_spec_emitted_tokens_total{variant="production"}']
    assert drafted >= accepted > 0 and emitted >= steps > 0
    assert values['ryz_spec_tokens_per_step_count{variant="production"}'] == steps
    assert values['ryz_spec_skipped_requests_total{variant="production"}'] >= 1
    assert values['ryz_spec_paused_steps_total{variant="production"}'] >= 0
    schema = httpx.get(f"{server.url}/openapi.json").json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "speculative" in body["properties"]


def test_ryz_generate_speculative_flags(zoo, native_library, capsys):
    from flows.cli import main

    base = ["generate", str(zoo["ryz-demo-m"]), EDIT, "--max-tokens", "16", "--temperature", "0", "--json"]
    outs = {}
    for method in ("off", "ngram", "draft"):
        assert main([*base, "--speculative", method, "--draft-model", str(zoo["ryz-demo-s"])]) == 0
        captured = capsys.readouterr()
        outs[method] = json.loads(captured.out)
        if method != "off":
            assert "drafted tokens accepted" in captured.err
    assert outs["ngram"]["token_ids"] == outs["off"]["token_ids"] == outs["draft"]["token_ids"]
    assert outs["ngram"]["speculative"]["steps"] > 0


def test_bench_harness_on_the_zoo(zoo, native_library):
    from evaluations import spec_bench

    model = NativeModel(zoo["ryz-demo-m"], native_library, threads=1, max_positions=128)
    try:
        prompt = np.random.default_rng(0).integers(0, model.hp.vocab, 32).tolist()
        verify = spec_bench.verify_cost(model, prompt, 3, 2)
        assert [v["k"] for v in verify] == [1, 2, 3] and verify[0]["relative"] == 1.0
        decode = spec_bench.decode_runs(model, ModelTokenizer(model.file), prompt, 16, 3)
    finally:
        model.close()
    runs = {r["run"]: r for r in decode["runs"]}
    assert all(r["same_output"] and r["tokens"] == 16 for r in runs.values())
    assert runs["replay k=3"]["acceptance"] == 1.0 and runs["replay k=3"]["tokens_per_step"] > 3
    for text in spec_bench.editing_prompts(3):
        head = text.rsplit("\n", 1)[1]
        assert head and head in text.rsplit("\n", 1)[0]  # the started line is in the prompt
    zoo_rows = spec_bench.zoo_acceptance(ZOO, native_library, 2, 4, gen=12)
    assert {(z["model"], z["method"]) for z in zoo_rows} >= {("ryz-demo-m", "ngram"), ("ryz-demo-m", "draft")}
    assert all(z["same_output"] for z in zoo_rows)


def test_logits_are_bit_identical_alone_and_in_a_batch(zoo, native_library):
    """Greedy identity rests on this: a token's logits do not depend on what else its forward holds (its own
    drafts after it, other sequences' tokens), on every kernel path this CPU has."""
    before = native_library.isa
    try:
        for isa in ("scalar", "avx2", "avx512", "neon"):
            if not native_library.isa_supported(isa):
                continue
            native_library.set_isa(isa)
            model = NativeModel(zoo["ryz-demo-m"], native_library, threads=2, max_seqs=3, max_positions=256)
            try:
                rng = np.random.default_rng(0)
                prompt = rng.integers(0, 512, 100).astype(np.int32)
                cont = rng.integers(0, 512, 9).astype(np.int32)
                model.forward_batch(prompt, np.zeros(100, np.int32))
                one = lambda t: np.ones(1, np.uint8)  # noqa: E731
                alone = [model.forward_batch(cont[i : i + 1], np.zeros(1, np.int32), one(i))[0] for i in range(9)]
                model.forward_batch(prompt, np.ones(100, np.int32))
                model.forward_batch(prompt[:50], np.full(50, 2, np.int32))
                tokens = np.concatenate([cont, prompt[50:70]]).astype(np.int32)
                seqs = np.concatenate([np.ones(9, np.int32), np.full(20, 2, np.int32)])
                want = np.concatenate([np.ones(9, np.uint8), np.zeros(20, np.uint8)])
                batch = model.forward_batch(tokens, seqs, want)
                assert all(np.array_equal(a, b) for a, b in zip(alone, batch)), isa
            finally:
                model.close()
    finally:
        native_library.set_isa(before)
