"""lm-eval model `ryzanstein`: a `TemplateLM` over the engine (native by default, numpy reference for checks).

    ryz lm-eval --model ryzanstein --model_args model=REF[,engine=reference][,max_seqs=8] --tasks mmlu_offline

`model` is any model reference `engine.artifacts.refs.resolve_model` accepts (artifact id or prefix, a .gguf path, and
the registry's names and aliases once it answers them). lm-eval 0.4.13 has no plugin discovery: importing
this module registers the name, which `ryz lm-eval` does before handing its arguments to lm-eval's CLI.

The adapter is a thin caller of the engine's synchronous batch API (`EngineCore.run` and `.score`, built by
`engine.serving.core.batch_engine`): the server's scheduler batches the requests, so scoring and generation
batch exactly as serving does, never one forward per token:
  - a (context, continuation) pair is one request whose prompt is both, scored from the continuation on;
    requests sharing a context wait for its first computation and copy its KV (the scheduler's prefix cache),
    so MMLU's four choices cost one context prefill and a few tokens each;
  - `loglikelihood_rolling` cuts documents with lm-eval's own rolling windows and scores the windows as
    requests of the same kind; `generate_until` decodes greedily (temperature 0) with the `until` strings as
    stop strings, and cuts the text at the first of them once more, as lm-eval expects;
  - the numpy reference (engine=reference) runs through the same scheduler (engine.model.reference.ReferenceSlots).

lm-eval's core imports no torch or transformers on this path (TemplateLM, the registry, the evaluator and
YAML tasks); `datasets` and `evaluate` come with it (torch-free).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models first: its registry imports them only while empty
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from engine.artifacts.refs import resolve_model
from engine.artifacts.store import open_store
from engine.model.ggufio import ModelFile
from engine.model.loader import open_model
from engine.model.reference import ReferenceModel, ReferenceSlots
from engine.model.tokenizer import ModelTokenizer
from engine.serving.chat import render_chat
from engine.serving.core import GenerationRequest, batch_engine
from engine.serving.sampling import SamplingParams
from engine.settings import get_settings
from evaluations import bars_disabled

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQS = 8  # sequence slots of the native context (lm-eval's --batch_size N > 1 overrides)
DEFAULT_MAX_LENGTH = 4096  # cap on positions per sequence when the model allows more
DEFAULT_MAX_BATCH_TOKENS = 4096
SCORE_CHUNK = 512  # requests handed to the engine at once (the progress bar moves per chunk)


# --- the lm-eval model ----------------------------------------------------------------------------


@register_model("ryzanstein")
class RyzansteinLM(TemplateLM):
    """lm-eval's view of a Ryzanstein model.

    model_args: model (or pretrained): a model reference; engine: native (default) or reference;
    max_seqs: native sequence slots per batch (default 8; lm-eval's --batch_size N > 1 sets it too);
    max_length: positions per sequence (default: the model's context, at most 4096); max_gen_toks (256);
    max_batch_tokens: tokens per forward when packing scoring batches (4096); threads (default RYZ_THREADS);
    add_bos_token: prepend BOS to contexts (default: what the GGUF's tokenizer says).
    """

    def __init__(
        self,
        model: Any = None,
        engine: str = "native",
        max_seqs: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        threads: int | None = None,
        add_bos_token: bool | None = None,
        tokenizer=None,
        pretrained: str | None = None,
        batch_size: Any = None,
        max_batch_size: Any = None,
        device: Any = None,
        library=None,
        **unused,
    ):
        super().__init__()
        if unused:
            log.warning("ryzanstein: ignoring unknown model_args %s", sorted(unused))
        if device not in (None, "cpu"):
            log.warning("ryzanstein: runs on the CPU; ignoring device=%s", device)
        model = model if model is not None else pretrained
        if model is None:
            raise ValueError(
                "ryzanstein needs a model: --model_args model=REF (artifact id or prefix, .gguf path, "
                "or a registry name/alias)"
            )
        if max_seqs is None:
            max_seqs = (
                int(batch_size)
                if isinstance(batch_size, int) or (isinstance(batch_size, str) and batch_size.isdigit())
                else 0
            )
            max_seqs = max_seqs if max_seqs > 1 else DEFAULT_MAX_SEQS
        self.max_seqs = int(max_seqs)
        if isinstance(model, (str, Path)):
            model = self._load(str(model), engine, max_length, threads, library)
        self.model_ref = str(getattr(getattr(model, "file", None), "path", type(model).__name__))
        self.engine = model
        if tokenizer is None:
            tokenizer = ModelTokenizer(model.file)
        self.tok = tokenizer
        if not hasattr(model, "forward_batch"):  # forward(tokens, cache) only: the numpy reference, test stubs
            context = int(getattr(model.hp, "context", 0) or DEFAULT_MAX_LENGTH)
            positions = int(max_length or min(context, DEFAULT_MAX_LENGTH)) + 1
            model = ReferenceSlots(model, self.max_seqs, positions)
        # a scored sequence feeds max_length + 1 tokens: the continuation's last one too
        self._max_length = int(max_length or model.max_positions - 1)
        if self._max_length + 1 > model.max_positions:
            raise ValueError(
                f"max_length={self._max_length} needs {self._max_length + 1} positions; the model was opened "
                f"with {model.max_positions}"
            )
        self.core = batch_engine(model, tokenizer, int(max_batch_tokens), model_id=self.model_ref)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = tokenizer.add_bos if add_bos_token is None else bool(add_bos_token)

    def _load(self, ref: str, engine: str, max_length: int | None, threads: int | None, library):
        settings = get_settings()
        path = resolve_model(ref, open_store(settings=settings))
        if engine == "reference":
            return ReferenceModel(path)
        if engine != "native":
            raise ValueError(f"engine must be native or reference, got {engine!r}")
        positions = int(max_length or min(ModelFile(path).hparams.context or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH))
        return open_model(
            path,
            "eval",
            settings=settings,
            library=library,
            threads=threads,
            max_seqs=self.max_seqs,
            max_positions=positions + 1,
        )

    def close(self) -> None:
        """Stop the engine's loop thread and free the model's context."""
        self.core.close()

    # -- TemplateLM's tokenisation hooks --

    @property
    def eot_token_id(self) -> int:
        if self.tok.eos_id is not None:
            return self.tok.eos_id
        return min(self.tok.stop_ids) if self.tok.stop_ids else 0

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"ryzanstein:{Path(str(self.model_ref)).name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """BOS first when the model wants one (add_special_tokens None: the model's choice; a string already
        starting with BOS gets no second one), then the text's ids."""
        add = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        ids = self.tok.tokenizer.encode(string, add_special_tokens=False).ids
        bos = self.tok.bos_id
        if add and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # -- scoring --

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # TemplateLM's "Tokenizing inputs" bar passes disable= explicitly, so TQDM_DISABLE alone misses it.
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or bars_disabled())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = []
        for _key, context, continuation in requests:
            if not continuation:
                raise ValueError("an empty continuation cannot be scored")
            full = (list(context) + list(continuation))[-(self._max_length + 1) :]
            context = full[: len(full) - len(continuation)]
            if not context:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens does not fit max_length={self._max_length}"
                )
            pairs.append((context, list(continuation)))
        results = []
        with tqdm(total=len(pairs), desc="ryzanstein loglikelihood", disable=disable_tqdm or bars_disabled()) as bar:
            for start in range(0, len(pairs), SCORE_CHUNK):  # chunks only to move the bar and fill the cache
                scored = self.core.score(pairs[start : start + SCORE_CHUNK])
                for (key, _, _), result in zip(requests[start : start + SCORE_CHUNK], scored):
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, result)
                results += scored
                bar.update(len(scored))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood over lm-eval's disjoint rolling windows (every token predicted
        exactly once, the first from the prefix token), windows of all documents scored together."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (lp, _greedy) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # -- generation --

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, budgets, untils = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kw.pop("max_gen_toks", kw.pop("max_tokens", self.max_gen_toks)))
            if kw.get("do_sample") or float(kw.get("temperature", 0) or 0) > 0:
                log.warning("ryzanstein: decodes greedily; ignoring do_sample/temperature %s", kw)
            budget = max(1, min(budget, self._max_length - 1))
            ids = self.tok_encode(context)[-(self._max_length - budget) :]
            prompts.append(ids)
            budgets.append(budget)
            untils.append([u for u in until if u])
        texts = []
        with tqdm(total=len(prompts), desc="ryzanstein generate_until", disable=disable_tqdm or bars_disabled()) as bar:
            for start in range(0, len(prompts), SCORE_CHUNK):
                batch = [
                    GenerationRequest(prompts[i], SamplingParams(temperature=0.0), budgets[i], untils[i])
                    for i in range(start, min(start + SCORE_CHUNK, len(prompts)))
                ]
                texts += [result.text for result in self.core.run(batch)]
                bar.update(len(batch))
        outputs = []
        for req, text, until in zip(requests, texts, untils):
            text = cut_at_stops(text, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs

    # -- chat templates (--apply_chat_template) --

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template or None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        bos = self.tok.tokenizer.id_to_token(self.tok.bos_id) if self.tok.bos_id is not None else ""
        eos = self.tok.tokenizer.id_to_token(self.tok.eos_id) if self.tok.eos_id is not None else ""
        text = render_chat(
            self.tok.chat_template,
            chat_history,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
        )
        return text


def cut_at_stops(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


# --- a Hugging Face tokenizer directory for lm-eval's API models ----------------------------------


def export_hf_tokenizer(model_ref: str | Path, directory: str | Path) -> Path:
    """Write the model's tokenizer as a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json),
    so lm-eval's `local-completions` can count tokens offline against `ryz serve`:

        --model local-completions --model_args base_url=http://127.0.0.1:8000/v1/completions,model=ryzanstein,
            tokenizer_backend=huggingface,tokenizer=DIR,tokenized_requests=True,add_bos_token=True

    A tokenizer.json without a post-processor gets one that prepends BOS when the model wants it, so the
    Hugging Face tokenizer with add_special_tokens=True encodes exactly as the engine does."""
    path = Path(model_ref)
    if not path.is_file():
        path = resolve_model(str(model_ref), open_store())
    tok = ModelTokenizer(ModelFile(path))
    data = json.loads(tok.tokenizer.to_str())
    bos = tok.tokenizer.id_to_token(tok.bos_id) if tok.bos_id is not None else None
    eos = tok.tokenizer.id_to_token(tok.eos_id) if tok.eos_id is not None else None
    if tok.add_bos and bos is not None and not data.get("post_processor"):
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": tok.add_bos,
        "model_max_length": int(ModelFile(path).hparams.context or DEFAULT_MAX_LENGTH),
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
