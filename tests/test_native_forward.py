"""The native forward against the numpy reference, on every kernel path this CPU runs.

Tolerances: with an fp32 KV cache the two compute the same float operations in the same order
(integer ternary sums; numpy's pairwise order for norms, attention dots and the softmax denominator;
sequential value sums; transcendentals rounded once from double on both sides), so no int8
activation step ever flips and logits agree to float rounding in the head: measured 2.2e-7 relative
L2 on every family and head type. Before the orders were aligned, flips gave 1e-3 to 2e-2 on the same
prompts, which is why the bound is 1e-5 and not looser. An fp16 KV cache rounds keys and values to
11 bits, which the next layer's int8 rounding amplifies on random weights to ~2 % relative L2
(measured 0.024 on tiny), so fp16 is held to 5 % and to the same greedy continuation.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import numpy as np
import pytest

from engine.model.ggufio import ModelFile
from engine.model.native import NativeModel
from engine.model.quantize import quantize_checkpoint
from engine.model.reference import ReferenceModel
from tests import checkpoints

PROMPT = [256, *b"hello world, this is a test of the native engine"]
FP32_TOL = 1e-5
FP16_TOL = 0.05


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    tiny = checkpoints.synth(root / "tiny", seed=5)
    out = {}
    for name, path in {
        "tiny": tiny,
        "silu": checkpoints.silu_variant(tiny, root / "silu"),
        "falcon3": checkpoints.falcon3_variant(tiny, root / "falcon3"),
        "onebit": checkpoints.onebit_variant(tiny, root / "onebit"),
    }.items():
        out[name] = root / f"{name}.gguf"
        quantize_checkpoint(path, out[name])
    out["tq1_0"] = root / "tq1.gguf"
    quantize_checkpoint(tiny, out["tq1_0"], weights="tq1_0", head="q6_k")
    out["tq1_same_head"] = root / "tq1-same-head.gguf"  # tiny's weights and head, ternary stored as TQ1_0
    quantize_checkpoint(tiny, out["tq1_same_head"], weights="tq1_0")
    out["f16head"] = root / "f16.gguf"
    quantize_checkpoint(tiny, out["f16head"], head="f16")
    medium = checkpoints.synth(root / "medium", "medium", seed=1)
    out["medium"] = root / "medium.gguf"
    quantize_checkpoint(medium, out["medium"])
    return out


@pytest.fixture(params=["scalar", "avx2", "avx512", "amx"])
def isa(request, native_library):
    if not native_library.isa_supported(request.param):
        pytest.skip(f"{request.param} kernels are not supported on this CPU")
    native_library.set_isa(request.param)
    yield request.param
    native_library.set_isa("auto")


@pytest.mark.parametrize("name", ["tiny", "silu", "falcon3", "onebit", "tq1_0", "f16head"])
def test_matches_reference_fp32_kv(models, native_library, isa, name):
    native = NativeModel(models[name], native_library, threads=2, max_positions=128, kv_type="f32")
    reference = ReferenceModel(models[name])
    assert _rel(native.forward(PROMPT), reference.forward(PROMPT)) < FP32_TOL


def test_medium_shape(models, native_library, isa):
    if isa == "scalar":
        pytest.skip("the scalar path is covered on tiny; medium would take minutes")
    native = NativeModel(models["medium"], native_library, threads=2, max_positions=64, kv_type="f32")
    reference = ReferenceModel(models["medium"])
    tokens = PROMPT[:24]
    assert _rel(native.forward(tokens), reference.forward(tokens)) < FP32_TOL


def test_a_long_prefill_matches_the_reference(models, native_library, isa):
    """160 tokens in one call: the AMX family's prefill path (from 32 tokens, tokens as the tile rows) and every
    other family's batched GEMM give the reference's logits; AMX, whose every other kernel is AVX-512's, gives
    AVX-512's bits (the integer GEMM is exact)."""
    _matches_reference_and_amx_is_avx512(models["tiny"], native_library, isa, (PROMPT * 4)[:160])


@pytest.mark.parametrize("n_tokens", [8, 16])
def test_a_one_token_tile_batch_matches_the_reference(models, native_library, isa, n_tokens):
    """8 and 16 tokens in one call (an 8- or 16-sequence decode step has as many): AMX's one-token-tile kernel on the
    medium shape (several 5-row-tile groups per thread, and a smaller last group) gives the reference's logits, and
    AVX-512's bits."""
    if isa == "scalar":
        pytest.skip("the scalar path is covered on tiny; medium would take minutes")
    _matches_reference_and_amx_is_avx512(models["medium"], native_library, isa, PROMPT[:n_tokens])


def _matches_reference_and_amx_is_avx512(model, native_library, isa, tokens):
    """One call over `tokens`: the reference's logits; on AMX (every kernel but the exact integer GEMM is
    AVX-512's), AVX-512's bits."""
    native = NativeModel(model, native_library, threads=2, max_positions=len(tokens) + 16, kv_type="f32")
    logits = native.forward(tokens)
    assert _rel(logits, ReferenceModel(model).forward(tokens)) < FP32_TOL
    if isa == "amx":
        native_library.set_isa("avx512")
        np.testing.assert_array_equal(logits, native.forward(tokens))


def test_fp16_kv_cache(models, native_library):
    native = NativeModel(models["tiny"], native_library, threads=2, max_positions=128, kv_type="f16")
    reference = ReferenceModel(models["tiny"])
    assert _rel(native.forward(PROMPT), reference.forward(PROMPT)) < FP16_TOL


@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_greedy_generation_identical(models, native_library, kv):
    native = NativeModel(models["tiny"], native_library, threads=2, max_positions=128, kv_type=kv)
    reference = ReferenceModel(models["tiny"])
    assert native.generate(PROMPT[:12], 32) == reference.generate(PROMPT[:12], 32)


def test_incremental_equals_batched(models, native_library):
    """Decoding token by token reproduces the batched prefill's logits (same KV, same positions)."""
    model = NativeModel(models["tiny"], native_library, threads=2, max_positions=128, kv_type="f32")
    batched = model.forward(PROMPT[:20])
    cache = model.new_cache()
    stepwise = np.concatenate([model.forward([t], cache) for t in PROMPT[:20]])
    assert _rel(stepwise, batched) < 1e-6


def test_batch_of_sequences_equals_separate_runs(models, native_library):
    """Tokens of several sequences in one forward call give each sequence its own result."""
    model = NativeModel(models["tiny"], native_library, threads=2, max_seqs=3, max_positions=64, kv_type="f32")
    prompts = [PROMPT[:7], PROMPT[3:15], PROMPT[10:14]]
    alone = [model.forward(p)[-1] for p in prompts]
    for s in range(3):
        model.new_cache(s)
    tokens = np.concatenate([np.asarray(p) for p in prompts])
    seqs = np.concatenate([np.full(len(p), s) for s, p in enumerate(prompts)])
    want = np.zeros(len(tokens), np.uint8)
    want[np.cumsum([len(p) for p in prompts]) - 1] = 1
    together = model.forward_batch(tokens, seqs, want)
    for s in range(3):
        assert _rel(together[s], alone[s]) < 1e-6


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
@pytest.mark.parametrize("name", ["tiny", "falcon3"])
def test_head_is_read_into_its_own_huge_pages(models, native_library, name):
    """The head (tied or not) is streamed every token: it is read into anonymous memory advised as huge
    pages ("hg"), byte for byte the file's tensor, and not served from the file's mapping."""
    model = NativeModel(models[name], native_library, threads=2, max_positions=16)
    head_name = "token_embd.weight" if model.hp.tied else "output.weight"
    head = model._head
    address = head.ctypes.data
    assert address % (2 << 20) == 0
    np.testing.assert_array_equal(head.view(np.uint8).reshape(-1), model.file.raw(head_name).view(np.uint8).reshape(-1))
    mapping, flags = None, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            mapping = line if start <= address < end else None
        elif mapping and line.startswith("VmFlags:"):
            flags = line
            break
    assert mapping is not None and len(mapping.split()) == 5, f"the head is in a file mapping: {mapping}"
    assert " hg" in flags, flags


def test_head_read_survives_a_kernel_that_refuses_the_advice(models, monkeypatch):
    """madvise(MADV_HUGEPAGE) is advice: a kernel built without THP refuses it (EINVAL), and the head is then read
    into ordinary pages, the same bytes."""
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 0x7FFF, raising=False)  # an advice no kernel knows: EINVAL
    file = ModelFile(models["falcon3"])
    head = file.allocate_resident("output.weight")
    file.read_into("output.weight", head)
    np.testing.assert_array_equal(head, file.raw("output.weight"))


def test_prefix_copy_and_release(models, native_library):
    """A copied prefix continues exactly like the original; a released slot frees its KV and works again."""
    model = NativeModel(models["tiny"], native_library, threads=1, max_seqs=2, max_positions=64, kv_type="f32")
    full = model.forward(PROMPT, model.new_cache(0))
    model.copy_seq(0, 1, 10)
    tail = model.forward(PROMPT[10:], _cache(model, 1))
    np.testing.assert_array_equal(tail, full[10:])
    assert model.kv_bytes() == 2 * model.kv_bytes_per_seq
    model.release_seq(1)
    assert model.kv_bytes() == model.kv_bytes_per_seq and model.seq_length(1) == 0
    np.testing.assert_array_equal(model.forward(PROMPT, model.new_cache(1)), full)


def _cache(model, seq):
    from engine.model.native import NativeCache

    return NativeCache(seq, model)


def test_threads_do_not_change_results(models, native_library):
    one = NativeModel(models["tiny"], native_library, threads=1, max_positions=64, kv_type="f32").forward(PROMPT)
    two = NativeModel(models["tiny"], native_library, threads=2, max_positions=64, kv_type="f32").forward(PROMPT)
    np.testing.assert_array_equal(one, two)


def test_models_on_two_threads_share_the_pool_and_keep_their_results(models, native_library):
    """Two models of one process (a server's production and canary) share one pool of workers: forwards called
    from two threads at once take turns region by region and give what each gives alone."""
    import threading

    pair = [
        NativeModel(models[n], native_library, threads=2, max_positions=64, kv_type="f32") for n in ("tiny", "silu")
    ]
    prompts = [PROMPT[:9], PROMPT]  # 9 tokens: decode-sized chunks; the whole prompt: the prefill path
    alone = [[m.forward(p) for p in prompts] for m in pair]
    mismatches: list[str] = []

    def hammer(i: int) -> None:
        for round_ in range(20):
            for p, expected in zip(prompts, alone[i]):
                if not np.array_equal(pair[i].forward(p), expected):
                    mismatches.append(f"model {i}, round {round_}, {len(p)} tokens")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a forward never returned: the shared pool deadlocked"
    assert not mismatches


def _forward_in_child(path, library_path, queue) -> None:
    from engine.model.native import Library

    model = NativeModel(path, Library(library_path), threads=2, max_positions=64, kv_type="f32")
    queue.put(model.forward(PROMPT[:9]))


def test_a_forked_child_gets_its_own_pool(models, native_library):
    """A process forked while a model is alive (multiprocessing's default on Linux) has no worker threads of
    its parent's pool: its models must start their own instead of waiting on workers that are not there."""
    import multiprocessing

    parent = NativeModel(models["tiny"], native_library, threads=2, max_positions=64, kv_type="f32")
    expected = parent.forward(PROMPT[:9])
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forward_in_child, args=(models["tiny"], native_library.path, queue))
    child.start()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    np.testing.assert_array_equal(got, expected)


def test_tq1_0_runs_the_1_6_bit_layout_with_tq2_0_results(models, native_library, isa):
    """TQ1_0 ternary tensors are repacked into T1P (1.6 bpw, fewer bytes than T2P) and give the TQ2_0 (T2P) model's
    logits bit for bit, in prefill (long, and 8 or 16 tokens) and in token-by-token decode (the GEMV path)."""
    from engine.model.native import TERNARY_LAYOUTS

    lib = native_library.lib
    t1 = NativeModel(models["tq1_same_head"], native_library, threads=2, max_positions=64, kv_type="f32")
    t2 = NativeModel(models["tiny"], native_library, threads=2, max_positions=64, kv_type="f32")
    hp = t1.hp
    shapes = [
        (hp.heads * hp.head_dim, hp.hidden),
        (hp.kv_heads * hp.head_dim, hp.hidden),
        (hp.kv_heads * hp.head_dim, hp.hidden),
        (hp.hidden, hp.heads * hp.head_dim),
        (hp.ffn, hp.hidden),
        (hp.ffn, hp.hidden),
        (hp.hidden, hp.ffn),
    ]
    want = {
        name: hp.layers * sum(lib.ryz_ternary_layout_bytes(layout, r, c) for r, c in shapes)
        for name, layout in TERNARY_LAYOUTS.items()
    }
    assert lib.ryz_model_repacked_bytes(t1.model) == want["t1p"] < want["t2p"] == lib.ryz_model_repacked_bytes(t2.model)
    np.testing.assert_array_equal(t1.forward(PROMPT), t2.forward(PROMPT))
    for n in (8, 16):  # one token tile: AMX loads T1P's A tiles from code bytes, with no T2P in between
        np.testing.assert_array_equal(t1.forward(PROMPT[:n]), t2.forward(PROMPT[:n]))
    c1, c2 = t1.new_cache(), t2.new_cache()
    for token in PROMPT[:6]:
        np.testing.assert_array_equal(t1.forward([token], c1), t2.forward([token], c2))
    t1.close()
    t2.close()


def test_bad_inputs_are_refused(models, native_library):
    from engine.model.native import NativeCapacityError, NativeError

    model = NativeModel(models["tiny"], native_library, threads=1, max_positions=8, kv_type="f32")
    with pytest.raises(NativeError, match="token id 9999 out of range"):
        model.forward([1, 9999])
    with pytest.raises(NativeCapacityError, match="is full"):
        model.forward(list(range(9)))
    assert model.library.lib.ryz_seq_length(model.context, 0) == 0  # a refused batch changes nothing


def test_logit_rows_are_the_nonzero_wants(models, native_library):
    """forward_batch returns one row per nonzero want_logits entry, as the native forward counts them (the logits
    buffer is not zeroed, so a row counted only on the Python side would be garbage), and refuses a want array of
    another length."""
    model = NativeModel(models["tiny"], native_library, threads=1, max_positions=16, kv_type="f32")
    tokens, seqs = np.array([5, 6, 7], np.int32), np.zeros(3, np.int32)
    expected = model.forward(tokens)[1:]
    model.truncate_seq(0, 0)
    got = model.forward_batch(tokens, seqs, np.array([0, 2, 1], np.uint8))
    assert got.shape == (2, model.hp.vocab) and np.array_equal(got, expected)
    model.truncate_seq(0, 0)
    with pytest.raises(ValueError, match="2 entries for 3 tokens"):
        model.forward_batch(tokens, seqs, np.array([1, 1], np.uint8))


def test_top_k_matches_numpy(native_library):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=5000).astype(np.float32)
    logits[[10, 20]] = logits.max() + 1  # a tie: the lower id comes first, as with np.argmax
    ids, values = native_library.top_k(logits, 8)
    order = np.argsort(-logits, kind="stable")[:8]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(values, logits[order])
    assert ids[0] == np.argmax(logits) == 10


def test_profile_times_each_part_of_the_forward(models, native_library):
    """ryz_context_profile: off until turned on; then every part of each call is timed and the parts add up to no
    more than the calls' wall time."""
    import time

    model = NativeModel(models["tiny"], native_library, threads=2, max_positions=64)
    model.forward(PROMPT[:8])
    assert model.profile()["calls"] == 0  # off by default: nothing counted
    model.set_profiling(True)
    cache = model.new_cache()
    start = time.perf_counter()
    for token in PROMPT[:5]:
        model.forward([token], cache)
    wall = time.perf_counter() - start
    profile = model.profile()
    assert profile["calls"] == 5
    assert set(profile["seconds"]) == {"ternary_linears", "head", "attention", "other"}
    assert all(v > 0 for v in profile["seconds"].values()) and sum(profile["seconds"].values()) <= wall
    model.set_profiling(False)
    assert model.profile()["calls"] == 0 and not any(model.profile()["seconds"].values())
    model.close()
