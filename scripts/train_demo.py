"""Train the demo model zoo: examples/zoo/ryz-demo-{s,m,ptq}.

Dev script, never imported by the engine: torch lives only in the script venv (see
scripts/requirements-fixtures.txt; `make zoo` runs it). Run from the repo root:

    .venv-scripts/bin/python scripts/train_demo.py              # all three, ~10 min on 2 cores
    .venv-scripts/bin/python scripts/train_demo.py --only s     # one of them (tokenizer + tasks too)

What it does, deterministically (seeded, one fixed thread count, deterministic torch algorithms):
1. writes the demo_* task data (evaluations/tasks/demo/*.jsonl) from the held-out seed;
2. generates the training corpus (evaluations.demo.corpus, TRAIN_SEED) and trains the byte-level BPE
   (evaluations.demo.tokenizer, vocab 512);
3. trains three models of one shape (DemoShape below, a BitNetForCausalLM as engine/model/reference.py runs it:
   relu² gated FFN, attention and FFN sub-norms, GQA, NeoX RoPE, tied embedding):
     s    quantization-aware (ternary absmean weights + int8 absmax per-token activations, straight-through
          estimators; the engine's own quantizers), STEPS_S steps
     m    the same, STEPS_M steps (longer training is the only difference)
     ptq  full precision (plain float linears, no quantizer), STEPS_PTQ steps, exported as is: the engine
          ternarizes it post hoc (absmean), which is what makes it a bad candidate;
4. scores each exported model (bf16 master weights, ternarized exactly as `ryz quantize` does) on the
   held-out demo suites in torch with evaluations.demo.score's metric code, prints the scores, and writes
   each checkpoint atomically (temp dir, then rename), plus examples/zoo/zoo.json and README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from engine.fsutil import atomic_directory  # noqa: E402
from engine.model.shapes import Shape  # noqa: E402
from evaluations.demo import corpus  # noqa: E402
from evaluations.demo.score import load_suites, newline_ids, score_all  # noqa: E402
from evaluations.demo.tokenizer import BOS, EOS, VOCAB_SIZE, save_tokenizer_files, train_tokenizer  # noqa: E402

ZOO = REPO / "examples" / "zoo"
# hidden 256 and FFN 768: every ternary row is a multiple of 256 wide (TQ2_0/TQ1_0 blocks).
DEMO_SHAPE = Shape(hidden=256, layers=2, heads=4, kv_heads=2, ffn=768, vocab=VOCAB_SIZE, context=256)
SEQ_LEN = 128  # training window (documents are 20-120 tokens; eval prompts are < 40)
BATCH = 32
TRAIN_DOCS = 40000  # ~2.2 M tokens of training text
TOKENIZER_DOCS = 20000  # the BPE is trained on the first 20000 of them
STEPS_S, STEPS_M, STEPS_PTQ = 150, 750, 300
LR_QAT, LR_FP = 3e-3, 1.5e-3
WARMUP = 50
WEIGHT_DECAY = 0.05
SEED = 0
THREADS = 2
ACT_EPS, SCALE_EPS = 1e-5, 1e-5  # engine/model/reference.py ACT_EPS, engine/model/ternary.py SCALE_EPS


@dataclass(frozen=True)
class Recipe:
    name: str
    qat: bool
    steps: int
    lr: float
    blurb: str


RECIPES = {
    "s": Recipe("ryz-demo-s", True, STEPS_S, LR_QAT, "BitNet b1.58 QAT, short training (the weaker candidate)"),
    "m": Recipe(
        "ryz-demo-m",
        True,
        STEPS_M,
        LR_QAT,
        f"BitNet b1.58 QAT, {STEPS_M // STEPS_S}x longer training (the stronger candidate)",
    ),
    "ptq": Recipe(
        "ryz-demo-ptq", False, STEPS_PTQ, LR_FP, "full-precision training, ternarized post hoc (the bad candidate)"
    ),
}


# ----------------------------------------------------------------------------------------------------
# the model: transformers' BitNetForCausalLM as engine/model/reference.py computes it


def ternary_weight(w: torch.Tensor) -> torch.Tensor:
    """engine/model/ternary.py quantize_absmean: scale = mean|W|, codes = clip(round(W / scale), -1, 1)."""
    inverse = 1.0 / w.abs().mean().clamp(min=SCALE_EPS)
    return (w * inverse).round().clamp(-1, 1) / inverse


def int8_activation(x: torch.Tensor) -> torch.Tensor:
    """engine/model/reference.py quantize_activations: per-token absmax to int8, back to float."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
    return (x * scale).round().clamp(-128, 127) / scale


class BitLinear(torch.nn.Linear):
    """A bias-free linear; quantized (with straight-through gradients) when `quantized` is set."""

    quantized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.weight)
        w = self.weight + (ternary_weight(self.weight) - self.weight).detach()
        x = x + (int8_activation(x) - x).detach()
        return F.linear(x, w)


class RMSNorm(torch.nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(torch.nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.hidden // s.heads
        self.q_proj = BitLinear(s.hidden, s.heads * self.head_dim, bias=False)
        self.k_proj = BitLinear(s.hidden, s.kv_heads * self.head_dim, bias=False)
        self.v_proj = BitLinear(s.hidden, s.kv_heads * self.head_dim, bias=False)
        self.o_proj = BitLinear(s.heads * self.head_dim, s.hidden, bias=False)
        self.attn_sub_norm = RMSNorm(s.heads * self.head_dim, s.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        group = self.heads // self.kv_heads  # query head j uses kv head j // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(self.attn_sub_norm(out.transpose(1, 2).reshape(b, t, -1)))


class MLP(torch.nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.gate_proj = BitLinear(s.hidden, s.ffn, bias=False)
        self.up_proj = BitLinear(s.hidden, s.ffn, bias=False)
        self.down_proj = BitLinear(s.ffn, s.hidden, bias=False)
        self.ffn_sub_norm = RMSNorm(s.ffn, s.rms_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ffn_sub_norm(F.relu(self.gate_proj(x)).square() * self.up_proj(x)))


class Layer(torch.nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden, s.rms_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden, s.rms_eps)
        self.mlp = MLP(s)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(torch.nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(s.vocab, s.hidden)
        self.layers = torch.nn.ModuleList(Layer(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden, s.rms_eps)


class DemoModel(torch.nn.Module):
    """Parameter names are transformers' (model.layers.0.self_attn.q_proj.weight ...); the head is tied."""

    def __init__(self, s: Shape, quantized: bool):
        super().__init__()
        self.shape = s
        self.model = Backbone(s)
        for module in self.modules():
            if isinstance(module, BitLinear):
                module.quantized = quantized
        head_dim = s.hidden // s.heads
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def set_quantized(self, quantized: bool) -> None:
        for module in self.modules():
            if isinstance(module, BitLinear):
                module.quantized = quantized

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x) @ self.model.embed_tokens.weight.T


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def init_weights(model: DemoModel, seed: int) -> None:
    """N(0, 0.02) for every linear and the embedding, ones for the norms (engine/model/synth.py's init without the
    norm noise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.fill_(1.0)


# ----------------------------------------------------------------------------------------------------
# data


def token_stream(tokenizer, docs: list[str]) -> np.ndarray:
    bos = tokenizer.token_to_id(BOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.int64)


def batches(stream: np.ndarray, steps: int, seed: int):
    """Random windows of SEQ_LEN + 1 tokens (inputs and shifted targets), a fixed sequence per seed."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - SEQ_LEN - 1, size=BATCH)
        window = torch.from_numpy(np.stack([stream[s : s + SEQ_LEN + 1] for s in starts]))
        yield window[:, :-1], window[:, 1:]


def train(recipe: Recipe, stream: np.ndarray) -> tuple[DemoModel, dict]:
    torch.manual_seed(SEED)
    model = DemoModel(DEMO_SHAPE, quantized=recipe.qat)
    init_weights(model, SEED)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < WARMUP:
            return recipe.lr * (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, recipe.steps - WARMUP)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    start = time.perf_counter()
    log_every = max(1, recipe.steps // 10)
    losses = []
    model.train()
    for step, (x, y) in enumerate(batches(stream, recipe.steps, SEED + 1)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = F.cross_entropy(model(x).reshape(-1, DEMO_SHAPE.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0:
            print(
                f"  {recipe.name} step {step + 1}/{recipe.steps} loss {np.mean(losses[-log_every:]):.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    seconds = time.perf_counter() - start
    round_to_bf16(model)
    model.eval()
    return model, {
        "steps": recipe.steps,
        "train_seconds": round(seconds, 1),
        "final_loss": round(float(np.mean(losses[-log_every:])), 4),
        "tokens_seen": recipe.steps * BATCH * SEQ_LEN,
    }


def round_to_bf16(model: DemoModel) -> None:
    """The exported masters are bf16: make the torch model compute with exactly those values."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


# ----------------------------------------------------------------------------------------------------
# evaluation (the held-out demo suites, metric code shared with evaluations/demo/score.py)


def torch_scores(model: DemoModel, tokenizer, quantized: bool, limit: int | None = None) -> dict:
    model.set_quantized(quantized)
    bos = tokenizer.token_to_id(BOS)

    def encode(text: str) -> list[int]:
        return [bos, *tokenizer.encode(text, add_special_tokens=False).ids]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def loglikelihood(pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        # Each sequence alone (batch 1): int8 activations are per token, so padding would not change
        # results, but the exact same shapes as the engine keep it simple.
        out = []
        for context, continuation in pairs:
            ids = [*context, *continuation]
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
            out.append(float(sum(lp[t - 1, ids[t]] for t in range(len(context), len(ids)))))
        return out

    @torch.no_grad()
    def generate(prompts: list[list[int]], max_tokens: int, stop_ids: set[int]) -> list[list[int]]:
        outputs = []
        for prompt in prompts:
            ids, out = list(prompt), []
            for _ in range(max_tokens):
                token = int(model(torch.tensor([ids]))[0, -1].argmax())
                out.append(token)
                if token in stop_ids:
                    break
                ids.append(token)
            outputs.append(out)
        return outputs

    stop = newline_ids(tokenizer.get_vocab(), decode) | {tokenizer.token_to_id(EOS)}
    result = score_all(load_suites(limit=limit), encode, decode, loglikelihood, generate, stop)
    model.set_quantized(True)
    return result


def heldout_loss(model: DemoModel, heldout: np.ndarray) -> float:
    with torch.no_grad():
        n = (len(heldout) - 1) // SEQ_LEN
        x = torch.from_numpy(heldout[: n * SEQ_LEN].reshape(n, SEQ_LEN))
        y = torch.from_numpy(heldout[1 : n * SEQ_LEN + 1].reshape(n, SEQ_LEN))
        return float(F.cross_entropy(model(x).reshape(-1, DEMO_SHAPE.vocab), y.reshape(-1)))


# ----------------------------------------------------------------------------------------------------
# export


def write_checkpoint(model: DemoModel, tokenizer, out_dir: Path, record: dict) -> None:
    """config + bf16 safetensors + tokenizer files + generation config, atomically (temp dir, rename)."""
    with atomic_directory(out_dir) as tmp:
        config = DEMO_SHAPE.hf_config()
        config["bos_token_id"], config["eos_token_id"] = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
        # Online BitNet quantization, like engine/model/synth.py: transformers ternarizes the masters at load time
        # (for ryz-demo-ptq that is exactly the post-training quantization that ruins it).
        config["quantization_config"] = {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "online",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "do_sample": False,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tensors = {name: p.detach().to(torch.bfloat16).contiguous() for name, p in sorted(model.named_parameters())}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_tokenizer_files(tokenizer, tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def summary(scores: dict) -> dict:
    mc, gen, ppl = scores["demo_mc"], scores["demo_gen"], scores["demo_ppl"]
    return {
        "mc_acc": round(mc["acc"], 4),
        "mc_acc_stderr": round(mc["acc_stderr"], 4),
        "mc_acc_norm": round(mc["acc_norm"], 4),
        "mc_by_kind": mc["acc_by_kind"],
        "gen_exact_match": round(gen["exact_match"], 4),
        "gen_exact_match_stderr": round(gen["exact_match_stderr"], 4),
        "gen_by_kind": gen["exact_match_by_kind"],
        "ppl_word_perplexity": round(ppl["word_perplexity"], 4),
        "ppl_byte_perplexity": round(ppl["byte_perplexity"], 4),
        "ppl_bits_per_byte": round(ppl["bits_per_byte"], 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the demo model zoo")
    parser.add_argument("--only", choices=sorted(RECIPES), action="append", help="train only these (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="override the step count (smoke runs)")
    parser.add_argument("--out", default=str(ZOO))
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items of each suite")
    parser.add_argument(
        "--readme-only", action="store_true", help="rewrite zoo.json and README.md from the models' training.json"
    )
    args = parser.parse_args(argv)
    if args.readme_only:
        write_index(Path(args.out))
        return

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    corpus.write_task_data()
    docs = corpus.documents(corpus.TRAIN_SEED, TRAIN_DOCS)
    tokenizer = train_tokenizer(docs[:TOKENIZER_DOCS])
    stream = token_stream(tokenizer, docs)
    heldout = token_stream(tokenizer, corpus.documents(corpus.HELDOUT_SEED * 1000 + 4, 300))
    print(f"corpus: {len(docs)} documents, {len(stream)} tokens; vocab {tokenizer.get_vocab_size()}", file=sys.stderr)

    out_root = Path(args.out)
    results = {}
    for key in args.only or ["s", "m", "ptq"]:
        recipe = RECIPES[key]
        if args.steps:
            recipe = Recipe(recipe.name, recipe.qat, args.steps, recipe.lr, recipe.blurb)
        print(f"training {recipe.name}: {recipe.blurb}", file=sys.stderr, flush=True)
        model, record = train(recipe, stream)
        start = time.perf_counter()
        model.set_quantized(True)  # every model is scored ternarized, as the engine runs it
        record["heldout_loss"] = round(heldout_loss(model, heldout), 4)
        record["torch_scores"] = summary(torch_scores(model, tokenizer, quantized=True, limit=args.limit))
        if not recipe.qat:  # the same weights before ternarization: what PTQ throws away
            model.set_quantized(False)
            record["heldout_loss_full_precision"] = round(heldout_loss(model, heldout), 4)
            record["torch_scores_full_precision"] = summary(
                torch_scores(model, tokenizer, quantized=False, limit=args.limit)
            )
            model.set_quantized(True)
        record["eval_seconds"] = round(time.perf_counter() - start, 1)
        record.update(
            name=recipe.name,
            recipe=recipe.blurb,
            qat=recipe.qat,
            lr=recipe.lr,
            batch=BATCH,
            seq_len=SEQ_LEN,
            warmup=WARMUP,
            weight_decay=WEIGHT_DECAY,
            seed=SEED,
            shape=DEMO_SHAPE.as_dict(),
            torch=torch.__version__,
            threads=THREADS,
            machine=platform.machine(),
        )
        write_checkpoint(model, tokenizer, out_root / recipe.name, record)
        results[recipe.name] = record
        print(json.dumps({recipe.name: record}, indent=2), flush=True)
    write_index(out_root)


def write_index(out_root: Path) -> None:
    """zoo.json (s, m, ptq) and, once all three are trained, README.md."""
    zoo = [
        {"name": RECIPES[k].name, "path": RECIPES[k].name, "description": RECIPES[k].blurb} for k in ("s", "m", "ptq")
    ]
    (out_root / "zoo.json").write_text(json.dumps({"schema": 1, "models": zoo}, indent=2) + "\n")
    records = {}
    for key in ("s", "m", "ptq"):
        path = out_root / RECIPES[key].name / "training.json"
        if path.is_file():
            records[key] = json.loads(path.read_text())
    if len(records) == 3:
        write_readme(out_root, records)


def write_readme(out_root: Path, records: dict[str, dict]) -> None:
    """README.md with the recipe and the torch-measured scores; the engine-side table between the markers
    is filled in by `python -m evaluations.demo.score --zoo` (kept when this rewrites the file)."""

    def row(label: str, r: dict, scores: dict, loss: float) -> str:
        return (
            f"| {label} | {r['steps']} | {r['train_seconds']:.0f} s | {loss:.3f} | "
            f"{scores['mc_acc']:.3f} ± {scores['mc_acc_stderr']:.3f} | {scores['mc_acc_norm']:.3f} | "
            f"{scores['gen_exact_match']:.3f} ± {scores['gen_exact_match_stderr']:.3f} | "
            f"{scores['ppl_word_perplexity']:.3f} | {scores['ppl_bits_per_byte']:.4f} |"
        )

    rows = [
        row(f"`{records[k]['name']}`", records[k], records[k]["torch_scores"], records[k]["heldout_loss"])
        for k in ("s", "m", "ptq")
    ]
    ptq = records["ptq"]
    rows.append(
        row(
            "`ryz-demo-ptq` before ternarization (full precision)",
            ptq,
            ptq["torch_scores_full_precision"],
            ptq["heldout_loss_full_precision"],
        )
    )
    kinds = [
        f"| `{records[k]['name']}` | "
        + " | ".join(f"{records[k]['torch_scores']['mc_by_kind'][c]:.2f}" for c in ("arith", "agree", "fact", "count"))
        + " | "
        + " | ".join(f"{records[k]['torch_scores']['gen_by_kind'][c]:.2f}" for c in ("arith", "fact", "count", "copy"))
        + " |"
        for k in ("s", "m", "ptq")
    ]
    readme = out_root / "README.md"
    engine_section = ENGINE_PLACEHOLDER
    if readme.is_file():
        old = readme.read_text()
        if ENGINE_BEGIN in old and ENGINE_END in old:
            engine_section = old[old.index(ENGINE_BEGIN) : old.index(ENGINE_END) + len(ENGINE_END)]
    s = records["s"]
    text = README_TEMPLATE.format(
        hidden=DEMO_SHAPE.hidden,
        layers=DEMO_SHAPE.layers,
        heads=DEMO_SHAPE.heads,
        kv_heads=DEMO_SHAPE.kv_heads,
        head_dim=DEMO_SHAPE.hidden // DEMO_SHAPE.heads,
        ffn=DEMO_SHAPE.ffn,
        vocab=DEMO_SHAPE.vocab,
        context=DEMO_SHAPE.context,
        params=sum(p.numel() for p in DemoModel(DEMO_SHAPE, True).parameters()),
        train_docs=TRAIN_DOCS,
        tok_docs=TOKENIZER_DOCS,
        batch=BATCH,
        seq=SEQ_LEN,
        lr_qat=LR_QAT,
        lr_fp=LR_FP,
        warmup=WARMUP,
        wd=WEIGHT_DECAY,
        steps_s=STEPS_S,
        steps_m=STEPS_M,
        steps_ptq=STEPS_PTQ,
        threads=THREADS,
        torch=s["torch"],
        rows="\n".join(rows),
        kinds="\n".join(kinds),
        engine_section=engine_section,
    )
    readme.write_text(text)


ENGINE_BEGIN, ENGINE_END = "<!-- engine-scores -->", "<!-- /engine-scores -->"
ENGINE_PLACEHOLDER = f"{ENGINE_BEGIN}\n(not measured yet: run `.venv/bin/python -m evaluations.demo.score --zoo examples/zoo`)\n{ENGINE_END}"

README_TEMPLATE = """\
# Demo model zoo

Three small BitNet b1.58 checkpoints in Hugging Face format (`BitNetForCausalLM`, bf16 master weights,
`config.json`, `tokenizer.json`), trained on the demo language of `evaluations/demo/corpus.py` so that
the pipeline has real candidates whose quality differs. Listed in `zoo.json` in the order s, m, ptq.
Generated, never hand-edited: `make zoo` (or `.venv-scripts/bin/python scripts/train_demo.py`, then
`.venv/bin/python -m evaluations.demo.score --zoo examples/zoo` for the engine table below).

| model | how it was made |
| --- | --- |
| `ryz-demo-s` | quantization-aware training (QAT), {steps_s} steps: the weaker candidate |
| `ryz-demo-m` | the same recipe, {steps_m} steps: the stronger candidate (same shape, so same speed) |
| `ryz-demo-ptq` | the same shape trained in full precision ({steps_ptq} steps, no quantizer), ternarized only afterwards (post-training quantization): what a bad candidate looks like |

**Shape** (all three): hidden {hidden}, {layers} layers, {heads} heads / {kv_heads} KV heads (head_dim {head_dim}),
FFN {ffn} (relu² gated, attention and FFN sub-norms), vocab {vocab}, tied embedding, rope_theta 500000,
rms_norm_eps 1e-5, context {context}: {params:,} parameters, `engine.model.shapes.SHAPES["tiny"]` with a 256 context.
Every ternary row is a multiple of 256 wide, so `ryz quantize` takes them as they are.

**Data.** {train_docs} documents of the demo language (TRAIN_SEED; five kinds of line: arithmetic facts,
counting, be-verb agreement across an attractor noun, facts about a fixed world of 24 people, copying
letters), about 2.4 M tokens. **Tokenizer**: byte-level BPE (`tokenizers`, ByteLevel pre-tokenizer and
decoder) trained on the first {tok_docs} documents, vocab {vocab}: bytes 0-255, the Llama-3 style specials
256-260 (BOS `<|begin_of_text|>` 256, EOS 257, the chat template of `engine/model/vocab.py`), then the merges.

**Training** (`scripts/train_demo.py`, torch {torch}, CPU, {threads} threads, deterministic algorithms, seed 0):
AdamW (0.9, 0.95), weight decay {wd} on matrices, gradient clip 1.0, {warmup} warmup steps then cosine to
10%, batch {batch} x {seq} tokens (random windows of the BOS-separated token stream), lr {lr_qat} for QAT and
{lr_fp} for full precision. QAT uses exactly the engine's quantizers with straight-through estimators:
weights per tensor absmean ternary (`engine/model/ternary.py` quantize_absmean: scale = mean|W|, codes =
clip(round(W / scale), -1, 1)), activations per token absmax int8 (`engine/model/reference.py`
quantize_activations), in every q/k/v/o/gate/up/down projection; embedding/head and norms stay float.
The exported masters are rounded to bf16 and every score below is measured on those bf16 weights.

## Held-out scores (torch, `scripts/train_demo.py`)

The demo suites (`evaluations/tasks/demo/`: `demo_mc` 400 items, 4 choices, chance 0.25; `demo_gen` 200
items, greedy until newline, exact match; `demo_ppl` 100 documents) come from the same generator with the
held-out seed. Scored on the ternarized model (as our engine runs it, except the head, which the GGUF
stores as Q8_0); ± is the standard error.

| model | steps | train time | held-out loss | demo_mc acc | acc_norm | demo_gen exact match | demo_ppl word ppl | bits/byte |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

By kind (demo_mc acc: arith, agree, fact, count; demo_gen exact match: arith, fact, count, copy):

| model | mc arith | mc agree | mc fact | mc count | gen arith | gen fact | gen count | gen copy |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{kinds}

The language is finite: held-out arithmetic and fact questions are fresh samples, not unseen facts (the
copy prompts are new letter strings). The held-out loss is the mean token cross-entropy over 300 further
held-out documents. Train times are wall clock on a 2-core machine shared with other jobs (0.3 s per
step when idle, up to 3 s under load), so they vary between runs; the weights do not.

`tests/test_demo_zoo.py` holds the committed zoo to these floors, through the numpy reference on the
first 48 demo_mc items (chance 0.25): `ryz-demo-s` >= 0.45, `ryz-demo-m` >= 0.85 and >= s + 0.2,
`ryz-demo-ptq` <= m - 0.2; and `ryz-demo-m` must answer at least 6 of the first 8 demo_gen prompts exactly.

## Through our engine

{engine_section}
"""


if __name__ == "__main__":
    main()
