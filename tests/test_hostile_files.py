"""Crafted model files: every header field the engine uses is checked before a tensor is mapped or handed to the
native engine, a violation is a GGUFFormatError (safetensors: CheckpointError) naming the field, the C ABI checks
the byte length of every tensor it is given, and a library of another ABI is refused saying so.

The GGUF cases are edits of a real tiny model artifact (our quantizer's output), made through the fuzz harness's
`GGUFParts` (tests/test_fuzz_formats.py), a small GGUF reader/writer independent of the engine's.
"""

from __future__ import annotations

import ctypes
import math
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from engine.errors import CheckpointError, GGUFFormatError
from engine.model.checkpoint import read_safetensors_header, write_safetensors
from engine.model.ggufio import ModelFile
from engine.model.loader import open_model
from engine.model.native import ABI_VERSION, GGML_TYPE_IDS, Library, NativeError, NativeModel, hparams_struct
from engine.model.quantize import quantize_checkpoint
from engine.serving.app import create_app
from engine.settings import Settings
from tests import checkpoints
from tests.test_fuzz_formats import ARRAY, FLOAT32, STRING, UINT32, GGUFParts, Raw, parse_gguf

ROOT = Path(__file__).resolve().parents[1]
LAST_ABI_3_COMMIT = "354152f"  # the last commit whose native/ is ABI 3 (set_tensor without a byte length)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A real tiny model artifact (relu², sub-norms, tied, TQ2_0 + Q8_0), as `ryz quantize` writes it."""
    root = tmp_path_factory.mktemp("hostile")
    path = root / "tiny.gguf"
    quantize_checkpoint(checkpoints.synth(root / "ckpt", seed=3), path)
    return path


def craft(tiny_gguf: Path, out: Path, edit: Callable[[GGUFParts], None]) -> Path:
    parts = parse_gguf(tiny_gguf.read_bytes())
    assert parts.to_bytes() == tiny_gguf.read_bytes()  # the parts writer is exact, so only the edit differs
    edit(parts)
    out.write_bytes(parts.to_bytes())
    return out


# --- the edits ------------------------------------------------------------------------------------------------------

ARCH = "ryz-bitnet"


def zero_length_scale_at_the_end(p: GGUFParts) -> None:
    """The measured case: the last tensor, a `.scale`, with no elements and the file ending where its data would
    start. 838c870 handed the native engine a pointer to the mapping's first bytes: the magic read as the scale."""
    last = p.tensors[-1]
    assert last[0].endswith(".scale")
    last[1] = [0]
    p.data = p.data[: last[3]]


def _kv(key: str, vtype: int, value) -> Callable[[GGUFParts], None]:
    return lambda p: p.set_kv(key, vtype, value)


def _tensor(name: str, dims: list[int] | None = None, type_id: int | None = None) -> Callable[[GGUFParts], None]:
    def edit(p: GGUFParts) -> None:
        t = p.tensor(name)
        t[1] = t[1] if dims is None else dims
        t[2] = t[2] if type_id is None else type_id

    return edit


def _duplicate_tensor(p: GGUFParts) -> None:
    p.tensors.append(list(p.tensor("blk.0.attn_q.weight")))


def _overlap(p: GGUFParts) -> None:
    p.tensor("blk.0.attn_k.weight")[3] = p.tensor("blk.0.attn_q.weight")[3]


def _counts(n_kv: int | None = None, n_tensors: int | None = None) -> Callable[[GGUFParts], None]:
    def edit(p: GGUFParts) -> None:
        p.n_kv, p.n_tensors = n_kv, n_tensors

    return edit


def _huge_array(p: GGUFParts) -> None:
    """An array of uint8 claiming 2^60 elements."""
    p.kvs.append(["ryz.test.huge", ARRAY, Raw(struct.pack("<IQ", 0, 1 << 60))])


def _unknown_value_type(p: GGUFParts) -> None:
    p.kv("general.name")[1:] = [13, Raw(struct.pack("<Q", 4) + b"tiny")]


def _nested_array(p: GGUFParts) -> None:
    p.kvs.append(["ryz.test.nested", ARRAY, (ARRAY, [(0, [1, 2])])])


# (edit, what the error must name). Every one of these loaded on 838c870 (a wrong model, or a ZeroDivisionError /
# KeyError traceback later) or was refused without naming the field.
CASES = {
    "zero-length scale at the end": (zero_length_scale_at_the_end, r"blk\.1\.ffn_down\.scale"),
    "scale with two values": (_tensor("blk.1.ffn_down.scale", dims=[2]), r"blk\.1\.ffn_down\.scale.*\[1\]"),
    "scale stored as F16": (_tensor("blk.1.ffn_down.scale", dims=[2], type_id=1), r"blk\.1\.ffn_down\.scale.*f32"),
    "general.alignment = 0": (_kv("general.alignment", UINT32, 0), "general.alignment"),
    "general.alignment = 48": (_kv("general.alignment", UINT32, 48), "general.alignment"),
    "general.alignment a string": (_kv("general.alignment", STRING, "32"), "general.alignment"),
    "head_count = 0": (_kv(f"{ARCH}.attention.head_count", UINT32, 0), r"attention\.head_count'"),
    "head_count_kv = 0": (_kv(f"{ARCH}.attention.head_count_kv", UINT32, 0), r"attention\.head_count_kv'"),
    "head_count not dividing the width": (_kv(f"{ARCH}.attention.head_count", UINT32, 3), r"head_count'.*divide"),
    "head_count_kv not dividing head_count": (
        _kv(f"{ARCH}.attention.head_count_kv", UINT32, 3),
        r"head_count_kv'.*divide",
    ),
    "head_count a string": (_kv(f"{ARCH}.attention.head_count", STRING, "4"), r"attention\.head_count'"),
    "odd head size": (_kv(f"{ARCH}.attention.key_length", UINT32, 63), r"key_length"),
    "block_count beyond the tensors": (_kv(f"{ARCH}.block_count", UINT32, 2**31 - 1), r"block_count"),
    "embedding_length = 0": (_kv(f"{ARCH}.embedding_length", UINT32, 0), r"embedding_length"),
    "rms epsilon NaN": (_kv(f"{ARCH}.attention.layer_norm_rms_epsilon", FLOAT32, math.nan), r"rms_epsilon"),
    "unknown FFN activation": (_kv(f"{ARCH}.ffn_activation", STRING, "gelu"), r"ffn_activation"),
    "dimension product overflows 64 bits": (_tensor("token_embd.weight", dims=[2**32, 2**32]), r"token_embd\.weight"),
    "dimension product overflows, four dims": (
        _tensor("blk.0.attn_norm.weight", dims=[2**16, 2**16, 2**16, 2**16]),
        r"blk\.0\.attn_norm\.weight",
    ),
    "unknown tensor type": (_tensor("blk.0.attn_q.weight", type_id=99), r"blk\.0\.attn_q\.weight.*type 99"),
    "a GGML type the engine does not read": (  # IQ1_S: a known GGML type, and smaller than TQ2_0 (no overlap)
        _tensor("blk.0.attn_q.weight", type_id=19),
        r"blk\.0\.attn_q\.weight.*iq1_s.*tq2_0",
    ),
    "norm of the wrong length": (_tensor("blk.0.attn_norm.weight", dims=[128]), r"blk\.0\.attn_norm\.weight.*shape"),
    "tensor listed twice": (_duplicate_tensor, r"blk\.0\.attn_q\.weight.*twice"),
    "tensor data overlapping another's": (_overlap, r"overlaps"),
    "metadata key twice": (lambda p: p.kvs.append(list(p.kv("general.name"))), r"general\.name.*twice"),
    "kv_count 2^63": (_counts(n_kv=2**63), "kv_count"),
    "tensor_count 2^64-1": (_counts(n_tensors=2**64 - 1), "tensor_count"),
    "array count 2^60": (_huge_array, r"ryz\.test\.huge.*count"),
    "unknown metadata value type": (_unknown_value_type, r"general\.name.*value type 13"),
    "array of arrays": (_nested_array, r"ryz\.test\.nested"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_gguf_is_refused_naming_the_field(tiny_gguf, tmp_path, case):
    edit, names = CASES[case]
    path = craft(tiny_gguf, tmp_path / "crafted.gguf", edit)
    with pytest.raises(GGUFFormatError, match=names) as caught:
        ModelFile(path)
    assert str(caught.value).startswith(str(path))


def test_the_unedited_file_loads(tiny_gguf):
    file = ModelFile(tiny_gguf)
    assert file.hparams.heads == 4 and file.shape("blk.1.ffn_down.scale") == (1,)


def test_a_zero_length_scale_never_reaches_the_native_engine(tiny_gguf, tmp_path, native_library):
    """838c870 loaded this file and ran it with the magic bytes as the last scale (13649.8 instead of ~0.03); now
    the loader refuses it before a tensor is handed over."""
    path = craft(tiny_gguf, tmp_path / "zero-scale.gguf", zero_length_scale_at_the_end)
    with pytest.raises(GGUFFormatError, match=r"blk\.1\.ffn_down\.scale"):
        NativeModel(path, native_library)
    with pytest.raises(GGUFFormatError, match=r"blk\.1\.ffn_down\.scale"):
        open_model(path, "generate", settings=Settings(), library=native_library)


def test_a_crafted_gguf_is_a_4xx_from_the_admin_load_route(tiny_gguf, tmp_path, native_library):
    """838c870 answered a bare `500 Internal Server Error` (a ZeroDivisionError for general.alignment = 0)."""
    crafted = craft(tiny_gguf, tmp_path / "align0.gguf", _kv("general.alignment", UINT32, 0))
    files = {"sha256:" + "a" * 64: crafted}

    def loader(ref: str, settings: Settings):
        return open_model(files[ref], "serve", settings=settings, library=native_library)

    app = create_app(Settings(store=f"file://{tmp_path}/store", admin_token="t0ken"), loader=loader)
    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.post(
            "/admin/variants",
            json={"name": "canary", "model": "sha256:" + "a" * 64},
            headers={"Authorization": "Bearer t0ken"},
        )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_model" and error["param"] == "model"
    assert "general.alignment" in error["message"]


# --- the C ABI: byte lengths ----------------------------------------------------------------------------------------


def _new_model(library: Library, file: ModelFile) -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    library.check(library.lib.ryz_model_new(ctypes.byref(hparams_struct(file.hparams)), ctypes.byref(handle)), "new")
    return handle


def _set(library: Library, handle, name: str, data: np.ndarray, n_bytes: int, qtype: str | int, rows: int, cols: int):
    type_id = GGML_TYPE_IDS[qtype] if isinstance(qtype, str) else qtype
    library.check(
        library.lib.ryz_model_set_tensor(handle, name.encode(), data.ctypes.data, n_bytes, type_id, rows, cols), name
    )


def test_the_native_loader_checks_every_byte_length(tiny_gguf, native_library):
    """The C ABI takes each tensor's byte length (ABI 4) and refuses one that does not match its type and shape, so
    a caller that skipped the Python checks still cannot make it read past a buffer."""
    lib = native_library
    assert lib.abi == ABI_VERSION == 5
    file = ModelFile(tiny_gguf)
    weight = np.ascontiguousarray(file.raw("blk.0.attn_q.weight"))
    scale = np.ones(2, np.float32)
    handle = _new_model(lib, file)
    try:
        with pytest.raises(NativeError, match=r"blk\.0\.attn_q\.weight.*16895 bytes.*16896"):
            _set(lib, handle, "blk.0.attn_q.weight", weight, weight.nbytes - 1, "tq2_0", 256, 256)
        with pytest.raises(NativeError, match=r"blk\.1\.ffn_down\.scale.*0 bytes"):
            _set(lib, handle, "blk.1.ffn_down.scale", scale, 0, "f32", 1, 1)
        with pytest.raises(NativeError, match=r"rows and cols must be positive"):
            _set(lib, handle, "blk.1.ffn_down.scale", scale, 0, "f32", 1, 0)
        with pytest.raises(NativeError, match=r"overflow"):
            _set(lib, handle, "token_embd.weight", weight, weight.nbytes, "f32", 2**62, 256)
        with pytest.raises(NativeError, match=r"whole blocks"):
            _set(lib, handle, "token_embd.weight", weight, weight.nbytes, "q8_0", 4, 100)
        with pytest.raises(NativeError, match=r"GGML type 2"):
            _set(lib, handle, "blk.0.attn_q.weight", weight, weight.nbytes, 2, 256, 256)  # Q4_0
        _set(lib, handle, "blk.0.attn_q.weight", weight, weight.nbytes, "tq2_0", 256, 256)
        with pytest.raises(NativeError, match=r"blk\.0\.attn_q\.weight.*twice"):
            _set(lib, handle, "blk.0.attn_q.weight", weight, weight.nbytes, "tq2_0", 256, 256)
    finally:
        lib.lib.ryz_model_free(handle)


def test_the_native_loader_wants_one_f32_value_per_scale(tiny_gguf, native_library):
    """Registered with a matching length but two values, a `.scale` is refused at finalize, naming it."""
    lib = native_library
    file = ModelFile(tiny_gguf)
    handle = _new_model(lib, file)
    arrays = []
    try:
        for name in file.tensors:
            data = np.ascontiguousarray(file.raw(name))
            arrays.append(data)
            shape = file.shape(name)
            rows, cols = (1, shape[0]) if len(shape) == 1 else shape
            if name == "blk.0.attn_k.scale":
                data = np.array([0.5, 0.5], np.float32)
                arrays.append(data)
                rows, cols = 1, 2
            _set(lib, handle, name, data, data.nbytes, file.tensor_type(name), rows, cols)
        with pytest.raises(NativeError, match=r"blk\.0\.attn_k\.scale.*one F32 value.*1x2"):
            lib.check(lib.lib.ryz_model_finalize(handle, 1), "finalize")
    finally:
        lib.lib.ryz_model_free(handle)


def test_a_crafted_block_count_is_refused_before_it_sizes_anything(tiny_gguf, native_library):
    """Found by the fuzz harness under ASan: ryz_model_new sized the layer table by block_count, so 2^31 - 1 layers
    was a 600 GB allocation whose std::bad_alloc crossed the C ABI (std::terminate). The table is now sized at
    finalize, after the count is checked against the tensors registered."""
    lib = native_library
    file = ModelFile(tiny_gguf)
    params = hparams_struct(file.hparams)
    params.layers = 2**31 - 1
    handle = ctypes.c_void_p()
    lib.check(lib.lib.ryz_model_new(ctypes.byref(params), ctypes.byref(handle)), "new")
    try:
        arrays = [np.ascontiguousarray(file.raw(name)) for name in file.tensors]
        for name, data in zip(file.tensors, arrays):
            shape = file.shape(name)
            rows, cols = (1, shape[0]) if len(shape) == 1 else shape
            _set(lib, handle, name, data, data.nbytes, file.tensor_type(name), rows, cols)
        with pytest.raises(NativeError, match=r"2147483647 layers need at least 9 tensors each; 38 are registered"):
            lib.check(lib.lib.ryz_model_finalize(handle, 1), "finalize")
    finally:
        lib.lib.ryz_model_free(handle)


def test_a_huge_context_is_a_status_not_an_abort(tiny_gguf, kernel_build):
    code = (
        "from engine.model.native import Library, NativeError, NativeModel\n"
        f"lib = Library({str(kernel_build.path)!r})\n"
        "try:\n"
        f"    NativeModel({str(tiny_gguf)!r}, lib, max_positions=2**31 - 1)\n"
        "except NativeError as exc:\n"
        "    print('refused:', exc)\n"
    )
    no_core = lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # noqa: E731 - an abort leaves no core file
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=no_core
    )
    assert proc.returncode == 0 and "refused:" in proc.stdout, proc.stderr[-2000:]


def test_a_batch_too_large_for_memory_is_a_status_not_an_abort(tiny_gguf, kernel_build):
    """The forward's scratch buffers grow with the batch: 2M tokens want GBs of them. With the address space limited to
    1 GB more than the process has, that allocation fails, and the caller gets a status (before the fix:
    std::terminate across the ABI)."""
    code = (
        "import resource\n"
        "import numpy as np\n"
        "from engine.model.native import Library, NativeError, NativeModel\n"
        f"model = NativeModel({str(tiny_gguf)!r}, Library({str(kernel_build.path)!r}), max_positions=64)\n"
        "tokens = np.zeros(2_000_000, np.int32)\n"
        "vm = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmSize:')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
        "try:\n"
        "    model.forward_batch(tokens, tokens)\n"
        "except NativeError as exc:\n"
        "    print('refused:', exc)\n"
        "print('after:', model.forward_batch(np.array([1], np.int32), np.array([0], np.int32)).shape)\n"
    )
    no_core = lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # noqa: E731 - an abort leaves no core file
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=no_core
    )
    assert proc.returncode == 0 and "refused:" in proc.stdout and "out of memory" in proc.stdout, proc.stderr[-2000:]
    assert "after: (1," in proc.stdout  # the context still works


def test_a_tiny_valid_scale_keeps_the_f16_cache_right(tiny_gguf, tmp_path, native_library):
    """A file whose attn_k scales are 2^-34 (valid: one finite F32 value) makes every key tiny; the f16 cache must
    still agree with the f32 one as it does at ordinary scales (2 % here), not differ by 140 %."""

    def tiny_k_scales(p: GGUFParts) -> None:
        data = bytearray(p.data)
        for layer in (0, 1):
            offset = p.tensor(f"blk.{layer}.attn_k.scale")[3]
            data[offset : offset + 4] = struct.pack("<f", 2.0**-34)
        p.data = bytes(data)

    path = craft(tiny_gguf, tmp_path / "tiny-k.gguf", tiny_k_scales)
    prompt = [256, *b"hello world"]
    f32 = NativeModel(path, native_library, kv_type="f32").forward(prompt)
    f16 = NativeModel(path, native_library, kv_type="f16").forward(prompt)
    assert np.linalg.norm(f16 - f32) / np.linalg.norm(f32) < 0.05


# --- the ABI version: another is refused, ABI 3 (older bundles) keeps serving ---------------------------------------


def _compiler() -> str:
    for name in ("c++", "g++", "clang++"):
        if found := shutil.which(name):
            return found
    pytest.skip("no C++ compiler")


def test_a_library_of_another_abi_is_refused_saying_so(tmp_path):
    """A stand-in library that reports ABI 99 and has none of the other symbols: refused by its version, before any
    symbol is looked up (838c870 looked them up first and died of an AttributeError)."""
    source = tmp_path / "stub.cpp"
    source.write_text('extern "C" int ryz_abi_version(void) { return 99; }\n')
    stub = tmp_path / "libstub.so"
    subprocess.run([_compiler(), "-shared", "-fPIC", "-o", str(stub), str(source)], check=True)
    with pytest.raises(NativeError, match=r"libstub\.so has ABI 99.*runs ABI 5.*ABI 3 and 4.*older serving bundles"):
        Library(stub)


@pytest.fixture(scope="module")
def abi3_library(tmp_path_factory):
    """A real ABI 3 kernel build: native/ as of the last ABI 3 commit, built once per machine into the settings
    cache (its source hash is its key), what a serving bundle made before ABI 4 carries."""
    from engine.errors import ToolchainNotFoundError
    from engine.model.build import build_kernels

    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git history for the ABI 3 sources")
    root = tmp_path_factory.mktemp("abi3")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", LAST_ABI_3_COMMIT, "native"], capture_output=True
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {LAST_ABI_3_COMMIT} is not in this checkout's history (shallow clone?)")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    try:
        built = build_kernels(settings=Settings(), native_dir=root / "native", progress=lambda message: None)
    except ToolchainNotFoundError as exc:
        pytest.skip(f"cannot build the native kernels: {exc}")
    return Library(built.path)


@pytest.mark.slow
def test_an_abi_3_library_from_an_older_bundle_keeps_serving(tiny_gguf, tmp_path, abi3_library, native_library):
    """An older bundle's own library (ABI 3: set_tensor without a byte length) still loads and computes what ABI 4
    does; the Python checks before it are what keep a crafted file away from it."""
    assert abi3_library.abi == 3 and native_library.abi == ABI_VERSION
    prompt = [256, *b"hostile"]
    old = NativeModel(tiny_gguf, abi3_library).forward(prompt)
    new = NativeModel(tiny_gguf, native_library).forward(prompt)
    np.testing.assert_allclose(old, new, rtol=0, atol=1e-5)
    crafted = craft(tiny_gguf, tmp_path / "zero-scale.gguf", zero_length_scale_at_the_end)
    with pytest.raises(GGUFFormatError, match=r"blk\.1\.ffn_down\.scale"):
        NativeModel(crafted, abi3_library)


# --- safetensors ----------------------------------------------------------------------------------------------------


def _safetensors(path: Path, header: bytes | str, data: bytes = b"") -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32x2 = '"dtype":"F32","shape":[2]'
ST_CASES = {
    "header a JSON list": ("[1, 2]", b"", "JSON object"),
    "offsets as strings": ('{"a":{' + F32x2 + ',"data_offsets":["0","8"]}}', bytes(8), r"'a'.*data_offsets"),
    "offsets reversed": ('{"a":{' + F32x2 + ',"data_offsets":[8,0]}}', bytes(8), r"'a'.*data_offsets"),
    "dtype a list": ('{"a":{"dtype":["F32"],"shape":[2],"data_offsets":[0,8]}}', bytes(8), r"'a'.*dtype"),
    "negative dims": ('{"a":{"dtype":"F32","shape":[-2,-1],"data_offsets":[0,8]}}', bytes(8), r"'a'.*shape"),
    "fractional dim": ('{"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}', bytes(8), r"'a'.*shape"),
    "dims overflow 64 bits": (
        '{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}',
        b"",
        r"'a'.*\[4294967296, 4294967296\]",
    ),
    "overlapping tensors": (
        '{"a":{' + F32x2 + ',"data_offsets":[0,8]},"b":{' + F32x2 + ',"data_offsets":[0,8]}}',
        bytes(8),
        r"'b'.*overlap",
    ),
    "a hole before a tensor": ('{"a":{' + F32x2 + ',"data_offsets":[8,16]}}', bytes(16), r"'a'.*hole"),
    "a tensor named twice": (
        '{"a":{' + F32x2 + ',"data_offsets":[0,8]},"a":{' + F32x2 + ',"data_offsets":[8,16]}}',
        bytes(16),
        r"'a'.*twice",
    ),
    "unknown dtype": ('{"a":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}}', bytes(8), r"'a'.*F8_E4M3"),
    "truncated data": ('{"a":{' + F32x2 + ',"data_offsets":[0,8]}}', bytes(4), "truncated"),
    "header claims 2^64-1 bytes": (None, b"", "header"),
}


@pytest.mark.parametrize("case", list(ST_CASES))
def test_a_crafted_safetensors_file_is_refused_naming_the_field(tmp_path, case):
    header, data, names = ST_CASES[case]
    path = tmp_path / "model.safetensors"
    if header is None:
        path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    else:
        _safetensors(path, header, data)
    with pytest.raises(CheckpointError, match=names):
        read_safetensors_header(path)


def test_a_safetensors_file_we_write_reads_back(tmp_path):
    path = tmp_path / "ok.safetensors"
    write_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.int8)})
    refs = read_safetensors_header(path)
    assert refs["a"].shape == (2, 3) and refs["b"].shape == (0,) and refs["b"].start == refs["b"].end
