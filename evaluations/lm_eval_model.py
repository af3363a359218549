"""lm-eval model `ryzanstein`: a `TemplateLM` over the engine (native by default, numpy reference for checks).

    ryz lm-eval --model ryzanstein --model_args model=REF[,engine=reference][,max_seqs=8] --tasks mmlu_offline

`model` is any model reference `engine.artifacts.refs.resolve_model` accepts (artifact id or prefix, a .gguf path, and
the registry's names and aliases once it answers them). lm-eval 0.4.13 has no plugin discovery: importing
this module registers the name, which `ryz lm-eval` does before handing its arguments to lm-eval's CLI.

Scoring is batched by prefill, never one forward per token:
  - requests are grouped by their (truncated) context; a group's context is prefilled once, and the logits of
    its last position score the first token of every continuation (single-token choices, as MMLU's " A",
    need nothing more);
  - longer continuations get the context's KV copied into their own sequence slot (`copy_seq`) and are fed
    together in one more forward (cut only to bound the logits held at once: 128 MB); groups are packed
    into batches by free slots and tokens, so a batch is typically two `forward_batch` calls;
  - the numpy reference has one sequence: it runs the same plan group by group.
`loglikelihood_rolling` cuts documents with lm-eval's own rolling windows and scores the windows as
requests of the same kind; `generate_until` decodes greedily (the native path steps all prompts of a batch
together) and cuts the text at the first `until` string itself, since lm-eval does not.

lm-eval's core imports no torch or transformers on this path (TemplateLM, the registry, the evaluator and
YAML tasks); `datasets` and `evaluate` come with it (torch-free).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models first: its registry imports them only while empty
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQS = 8  # sequence slots of the native context (lm-eval's --batch_size N > 1 overrides)
DEFAULT_MAX_LENGTH = 4096  # cap on positions per sequence when the model allows more
DEFAULT_MAX_BATCH_TOKENS = 4096
MAX_LOGIT_VALUES = 32 << 20  # floats of logits per forward (128 MB): 256 rows at a 128k vocabulary


# --- scoring plan ---------------------------------------------------------------------------------


@dataclass
class _Group:
    """Requests sharing one context: (request index, continuation tokens) each."""

    context: list[int]
    items: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def slots(self) -> int:
        """Sequence slots needed: one per continuation longer than a token (at least the context's own)."""
        return max(1, sum(len(c) > 1 for _, c in self.items))

    @property
    def tokens(self) -> int:
        return len(self.context) + sum(len(c) - 1 for _, c in self.items)


def row_scores(logits: np.ndarray, targets) -> tuple[np.ndarray, np.ndarray]:
    """Per row: log-probability of its target token, and whether the target is the row's argmax."""
    x = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(targets)
    idx = np.arange(len(targets))
    peak = x.max(axis=1)
    lse = peak.astype(np.float64) + np.log(np.exp(x - peak[:, None]).sum(axis=1, dtype=np.float64))
    return x[idx, targets].astype(np.float64) - lse, x.argmax(axis=1) == targets


def continuation_score(logits: np.ndarray, continuation: list[int]) -> tuple[float, bool]:
    """Sum of log-probabilities of `continuation` and whether greedy decoding would produce it.
    Row i of `logits` is the distribution that predicts continuation[i]."""
    lp, greedy = row_scores(logits, continuation)
    return float(lp.sum()), bool(greedy.all())


def plan_groups(requests: list[tuple[list[int], list[int]]], max_slots: int) -> list[_Group]:
    """Group (context, continuation) pairs by context, in first-seen order; a group never needs more than
    `max_slots` slots (more continuations split it, each part prefilling the context again)."""
    by_context: dict[tuple[int, ...], list[_Group]] = {}
    groups: list[_Group] = []
    for index, (context, continuation) in enumerate(requests):
        parts = by_context.setdefault(tuple(context), [])
        if not parts or (
            len(continuation) > 1 and parts[-1].slots >= max_slots and any(len(c) > 1 for _, c in parts[-1].items)
        ):
            parts.append(_Group(list(context)))
            groups.append(parts[-1])
        parts[-1].items.append((index, continuation))
    return groups


def pack_batches(groups: list[_Group], max_slots: int, max_tokens: int) -> Iterable[list[_Group]]:
    batch, slots, tokens = [], 0, 0
    for g in groups:
        if batch and (slots + g.slots > max_slots or tokens + g.tokens > max_tokens):
            yield batch
            batch, slots, tokens = [], 0, 0
        batch.append(g)
        slots += g.slots
        tokens += g.tokens
    if batch:
        yield batch


# --- backends -------------------------------------------------------------------------------------


class NativeBackend:
    """Scores and generates over several sequence slots of a NativeModel context."""

    def __init__(self, model, max_logit_values: int = MAX_LOGIT_VALUES):
        self.model = model
        self.slots = model.max_seqs
        self.max_positions = model.max_positions
        self.max_rows = max(1, max_logit_values // model.hp.vocab)  # logits rows per forward (vocab floats each)

    def score(self, batch: list[_Group]) -> dict[int, tuple[float, bool]]:
        m = self.model
        # Phase 1: every context of the batch in one forward; the last position's logits score each
        # continuation's first token.
        tokens, seqs, want = [], [], []
        for slot, g in enumerate(batch):
            m.truncate_seq(slot, 0)
            tokens += g.context
            seqs += [slot] * len(g.context)
            want += [0] * (len(g.context) - 1) + [1]
        first = m.forward_batch(np.array(tokens), np.array(seqs), np.array(want, np.uint8))
        totals: dict[int, list] = {}
        for gi, g in enumerate(batch):
            lp, greedy = row_scores(np.repeat(first[gi : gi + 1], len(g.items), axis=0), [c[0] for _, c in g.items])
            for k, (index, _cont) in enumerate(g.items):
                totals[index] = [float(lp[k]), bool(greedy[k])]
        # Phase 2: continuations longer than one token, each in a slot holding a copy of its context's KV,
        # fed in order; forwards are cut so at most `max_rows` logit rows exist at once.
        tokens, seqs, owners, targets = [], [], [], []
        free = len(batch)
        for gi, g in enumerate(batch):
            base_taken = False
            for index, cont in g.items:
                if len(cont) == 1:
                    continue
                if base_taken:
                    slot, free = free, free + 1
                    m.copy_seq(gi, slot, len(g.context))
                else:
                    slot, base_taken = gi, True
                tokens += cont[:-1]
                seqs += [slot] * (len(cont) - 1)
                owners += [index] * (len(cont) - 1)
                targets += cont[1:]
        for a in range(0, len(tokens), self.max_rows):
            b = min(a + self.max_rows, len(tokens))
            rows = m.forward_batch(np.array(tokens[a:b]), np.array(seqs[a:b]), np.ones(b - a, np.uint8))
            lp, greedy = row_scores(rows, targets[a:b])
            for index, x, g in zip(owners[a:b], lp, greedy):
                totals[index][0] += float(x)
                totals[index][1] = totals[index][1] and bool(g)
        return {index: (t[0], t[1]) for index, t in totals.items()}

    def generate(
        self, prompts: list[list[int]], max_new: list[int], done: Callable[[int, list[int]], bool]
    ) -> list[list[int]]:
        m = self.model
        out: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(prompts), self.slots):
            chunk = list(range(start, min(start + self.slots, len(prompts))))
            tokens, seqs, want = [], [], []
            for slot, i in enumerate(chunk):
                m.truncate_seq(slot, 0)
                tokens += prompts[i]
                seqs += [slot] * len(prompts[i])
                want += [0] * (len(prompts[i]) - 1) + [1]
            logits = m.forward_batch(np.array(tokens), np.array(seqs), np.array(want, np.uint8))
            active = list(enumerate(chunk))
            while active:
                still = []
                for row, (slot, i) in enumerate(active):
                    out[i].append(int(np.argmax(logits[row])))
                    if not (done(i, out[i]) or len(out[i]) >= max_new[i]):
                        still.append((slot, i))
                active = still
                if active:
                    logits = m.forward_batch(
                        np.array([out[i][-1] for _, i in active]),
                        np.array([s for s, _ in active]),
                        np.ones(len(active), np.uint8),
                    )
        return out


class SequentialBackend:
    """One sequence at a time for models with `forward(tokens, cache)` only (the numpy reference, stubs).
    A group's continuations fork the context's cache, so a batch may hold any number of them."""

    slots = 1 << 16

    def __init__(self, model, max_positions: int):
        self.model = model
        self.max_positions = max_positions

    def _new_cache(self):
        if hasattr(self.model, "new_cache"):
            return self.model.new_cache()
        from engine.model.reference import KVCache

        return KVCache()

    @staticmethod
    def _fork(cache):
        from engine.model.reference import KVCache

        if isinstance(cache, KVCache):  # layers' arrays are replaced, never written in place: share them
            return KVCache(list(cache.keys), list(cache.values))
        return copy.copy(cache)

    def score(self, batch: list[_Group]) -> dict[int, tuple[float, bool]]:
        results = {}
        for g in batch:
            cache = self._new_cache()
            first = self.model.forward(g.context, cache)[-1:]
            rows, owners = [], []
            for index, cont in g.items:
                if len(cont) > 1:
                    rows.append(self.model.forward(cont[:-1], self._fork(cache)))
                    owners.append(index)
            results.update(_collect([g], first, np.concatenate(rows) if rows else None, owners))
        return results

    def generate(
        self, prompts: list[list[int]], max_new: list[int], done: Callable[[int, list[int]], bool]
    ) -> list[list[int]]:
        out = []
        for i, prompt in enumerate(prompts):
            cache = self._new_cache()
            logits = self.model.forward(prompt, cache)[-1]
            ids: list[int] = []
            while True:
                ids.append(int(np.argmax(logits)))
                if done(i, ids) or len(ids) >= max_new[i]:
                    break
                logits = self.model.forward([ids[-1]], cache)[-1]
            out.append(ids)
        return out


def _collect(
    batch: list[_Group], first: np.ndarray, rest: np.ndarray | None, owners: list[int]
) -> dict[int, tuple[float, bool]]:
    """Scores from phase-1 rows (one per group, in batch order) and phase-2 rows (each owner's continuation
    minus its last token, in `owners` order)."""
    continuations = {index: cont for g in batch for index, cont in g.items}
    spans, pos = {}, 0
    for index in owners:
        spans[index] = (pos, pos + len(continuations[index]) - 1)
        pos = spans[index][1]
    results = {}
    for gi, g in enumerate(batch):
        for index, cont in g.items:
            rows = first[gi : gi + 1]
            if index in spans:
                a, b = spans[index]
                rows = np.concatenate([rows, rest[a:b]])
            results[index] = continuation_score(rows, cont)
    return results


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
            from engine.model.tokenizer import ModelTokenizer

            tokenizer = ModelTokenizer(model.file)
        self.tok = tokenizer
        context = int(getattr(model.hp, "context", 0) or DEFAULT_MAX_LENGTH)
        if hasattr(model, "forward_batch"):
            self.backend = NativeBackend(model)
            self._max_length = int(max_length or min(context, model.max_positions))
            if self._max_length > model.max_positions:
                raise ValueError(
                    f"max_length={self._max_length} exceeds the native context's {model.max_positions} positions"
                )
        else:
            self._max_length = int(max_length or min(context, DEFAULT_MAX_LENGTH))
            self.backend = SequentialBackend(model, self._max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.max_batch_tokens = int(max_batch_tokens)
        self.add_bos = tokenizer.add_bos if add_bos_token is None else bool(add_bos_token)

    def _load(self, ref: str, engine: str, max_length: int | None, threads: int | None, library):
        from engine.artifacts.refs import resolve_model
        from engine.artifacts.store import open_store
        from engine.settings import get_settings

        settings = get_settings()
        path = resolve_model(ref, open_store(settings=settings))
        if engine == "reference":
            from engine.model.reference import ReferenceModel

            return ReferenceModel(path)
        if engine != "native":
            raise ValueError(f"engine must be native or reference, got {engine!r}")
        from engine.model.ggufio import ModelFile
        from engine.model.loader import open_model

        positions = int(max_length or min(ModelFile(path).hparams.context or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH))
        return open_model(
            path,
            "eval",
            settings=settings,
            library=library,
            threads=threads,
            max_seqs=self.max_seqs,
            max_positions=positions,
        )

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
        results: dict[int, tuple[float, bool]] = {}
        groups = plan_groups(pairs, self.backend.slots)
        with tqdm(total=len(pairs), desc="ryzanstein loglikelihood", disable=disable_tqdm) as bar:
            for batch in pack_batches(groups, self.backend.slots, self.max_batch_tokens):
                scored = self.backend.score(batch)
                results.update(scored)
                for index in scored:
                    key = requests[index][0]
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, scored[index])
                bar.update(len(scored))
        return [results[i] for i in range(len(pairs))]

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
        stop_ids = set(self.tok.stop_ids)

        def done(i: int, ids: list[int]) -> bool:
            if ids[-1] in stop_ids:
                return True
            return bool(untils[i]) and any(u in self.tok.decode(ids) for u in untils[i])

        outputs = []
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        generated: dict[int, list[int]] = {}
        with tqdm(total=len(prompts), desc="ryzanstein generate_until", disable=disable_tqdm) as bar:
            step = max(1, self.backend.slots)
            for start in range(0, len(order), step):
                chunk = order[start : start + step]
                got = self.backend.generate(
                    [prompts[i] for i in chunk],
                    [budgets[i] for i in chunk],
                    lambda j, ids, chunk=chunk: done(chunk[j], ids),
                )
                generated.update(zip(chunk, got))
                bar.update(len(chunk))
        for i, req in enumerate(requests):
            ids = generated[i]
            if ids and ids[-1] in stop_ids:
                ids = ids[:-1]
            text = cut_at_stops(self.tok.decode(ids), untils[i])
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs

    # -- chat templates (--apply_chat_template) --

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template or None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from engine.serving.chat import render_chat

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
    from engine.artifacts.refs import resolve_model
    from engine.artifacts.store import open_store
    from engine.model.ggufio import ModelFile
    from engine.model.tokenizer import ModelTokenizer

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
