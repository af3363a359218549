"""The fuzz harness of the model file readers, bounded (docs/artifact-format.md "Validation").

Targets, and what each may do with any input (anything else is a crash):
  gguf         `ModelFile(path)` returns, or raises GGUFFormatError; on a file it accepts, every tensor maps
  safetensors  `read_safetensors_header(path)` returns, or raises CheckpointError
  native       the kernels' sanitizer build (ASan + UBSan) in a child Python with libasan preloaded: a GGUF that
               ModelFile accepts is loaded into the native engine, every tensor copied into a malloc'd buffer of
               exactly its length (so a read past one is an ASan report), and runs a token, or the engine refuses
               it with a status; the C ABI driven directly (wrong byte lengths, shapes, types, names, scales,
               hyperparameters) returns a status

Inputs are mutations of real small files, our quantizer's tiny GGUF and the packed test checkpoint's safetensors:
truncation, bit flips, integer header fields set to boundary values (counts, lengths, types, dims, offsets: the huge
counts) and swapped, and structured cases drawn by Hypothesis (metadata values of every GGUF type, tensor infos,
safetensors header entries). `make test` runs a fixed, derandomized number of cases (RYZ_FUZZ_EXAMPLES per Hypothesis
target, default 150) and prints the counts in its summary; `make fuzz` runs many more, then atheris's coverage-guided
search of each reader (`python -m tests.test_fuzz_formats atheris gguf|safetensors SECONDS`). A crash fails the test
and saves its input under build/fuzz-crashes/ (RYZ_FUZZ_CRASH_DIR).
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import CheckpointError, GGUFFormatError, ToolchainNotFoundError
from engine.model import checkpoint, ggufio
from engine.model.autotune import TuneShape, write_tuning_model
from engine.model.build import build_kernels
from engine.model.checkpoint import read_safetensors_header
from engine.model.ggufio import ModelFile
from engine.model.native import GGML_TYPE_IDS, Library, hparams_struct
from engine.model.quantize import quantize_checkpoint
from engine.settings import Settings
from tests import checkpoints

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("RYZ_FUZZ_EXAMPLES", "150"))  # per Hypothesis target; `make fuzz` raises it
NATIVE_FILES = max(40, EXAMPLES // 4)  # mutated GGUFs through the sanitized native loader
NATIVE_ABI_CASES = max(80, EXAMPLES // 2)  # direct C ABI cases there
CRASH_DIR = Path(os.environ.get("RYZ_FUZZ_CRASH_DIR", ROOT / "build" / "fuzz-crashes"))
CORPUS_DIR = ROOT / "build" / "fuzz-corpus"  # atheris's growing corpus, per reader
HANG_SECONDS = 5.0  # one case taking longer is a crash too (a count that was not checked before a loop)
PACKED_SAFETENSORS = ROOT / "tests" / "fixtures" / "hf-bitnet-tiny-packed" / "model.safetensors"
# Boundary values for integer fields: small sizes, block and alignment edges, and the 32/63/64-bit limits.
INTERESTING: tuple[int, ...] = (0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 63, 64, 255, 256, 257, 4095, 4096, 65535, 65536)
INTERESTING += (2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1)

# --- GGUF parts: a file read into editable parts and written back byte for byte -------------------------------------

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
UINT32, FLOAT32, STRING, ARRAY = 4, 6, 8, 9


class Raw(bytes):
    """A metadata value written verbatim (after its type): malformed arrays, types GGUF does not know."""


@dataclass
class GGUFParts:
    """A GGUF file as editable parts. `kvs`: [key, value type, value] (an array's value is (element type, items), a
    `Raw` value is written as it is); `tensors`: [name, dims (GGUF order), GGML type, offset]; `data`: the bytes from
    the aligned end of the header to the end of the file; `n_kv`/`n_tensors` override the counts. `to_bytes` records
    in `fields` where each integer header field went: (offset, size, kind)."""

    version: int
    kvs: list[list]
    tensors: list[list]
    data: bytes
    alignment: int = 32
    n_kv: int | None = None
    n_tensors: int | None = None
    fields: list[tuple[int, int, str]] = field(default_factory=list)

    def kv(self, key: str) -> list:
        return next(kv for kv in self.kvs if kv[0] == key)

    def set_kv(self, key: str, vtype: int, value) -> None:
        for kv in self.kvs:
            if kv[0] == key:
                kv[1:] = [vtype, value]
                return
        self.kvs.append([key, vtype, value])

    def tensor(self, name: str) -> list:
        return next(t for t in self.tensors if t[0] == name)

    def to_bytes(self) -> bytes:
        self.fields = []
        out = bytearray(b"GGUF")

        def put(fmt: str, value, kind: str = "") -> None:
            if kind:
                self.fields.append((len(out), struct.calcsize(fmt), kind))
            out.extend(struct.pack(fmt, value))

        def put_string(text: str | bytes, kind: str) -> None:
            raw = text.encode() if isinstance(text, str) else text
            put("<Q", len(raw), kind)
            out.extend(raw)

        def put_value(vtype: int, value) -> None:
            if isinstance(value, Raw):
                out.extend(value)
            elif vtype in SCALARS:
                put(SCALARS[vtype], value, "value" if SCALARS[vtype] in ("<I", "<Q") else "")
            elif vtype == STRING:
                put_string(value, "string length")
            else:
                elem, items = value
                put("<I", elem, "array type")
                put("<Q", len(items), "array count")
                for item in items:
                    put_value(elem, item)

        put("<I", self.version, "version")
        put("<Q", len(self.tensors) if self.n_tensors is None else self.n_tensors, "tensor_count")
        put("<Q", len(self.kvs) if self.n_kv is None else self.n_kv, "kv_count")
        for key, vtype, value in self.kvs:
            put_string(key, "key length")
            put("<I", vtype, "value type")
            put_value(vtype, value)
        for name, dims, type_id, offset in self.tensors:
            put_string(name, "tensor name length")
            put("<I", len(dims), "n_dims")
            for d in dims:
                put("<Q", d, "dim")
            put("<I", type_id, "tensor type")
            put("<Q", offset, "tensor offset")
        out.extend(b"\0" * (-len(out) % self.alignment))
        return bytes(out) + self.data


def parse_gguf(raw: bytes) -> GGUFParts:
    pos = 4

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return raw[pos - n : pos].decode()

    def value(vtype: int):
        if vtype in SCALARS:
            return take(SCALARS[vtype])
        if vtype == STRING:
            return string()
        elem, count = take("<I"), take("<Q")
        return (elem, [value(elem) for _ in range(count)])

    assert raw[:4] == b"GGUF"
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    kvs = []
    for _ in range(n_kv):
        key = string()
        vtype = take("<I")
        kvs.append([key, vtype, value(vtype)])
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        tensors.append([name, dims, take("<I"), take("<Q")])
    alignment = next((v for k, _, v in kvs if k == "general.alignment"), 32)
    return GGUFParts(version, kvs, tensors, raw[(pos + alignment - 1) // alignment * alignment :], alignment)


# --- mutations ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """A real file to mutate: its bytes, its integer header fields by kind, and where its header ends."""

    raw: bytes
    fields: dict[str, list[tuple[int, int]]]
    header_end: int


def gguf_seed(raw: bytes) -> Seed:
    parts = parse_gguf(raw)
    assert parts.to_bytes() == raw
    fields: dict[str, list[tuple[int, int]]] = {}
    for offset, size, kind in parts.fields:
        fields.setdefault(kind, []).append((offset, size))
    return Seed(raw, fields, len(raw) - len(parts.data))


def safetensors_seed(raw: bytes) -> Seed:
    return Seed(raw, {"header length": [(0, 8)]}, 8 + struct.unpack_from("<Q", raw)[0])


def apply_ops(seed: Seed, ops: list[tuple]) -> bytes:
    """The seed with `ops` applied in order: ("truncate", at), ("flip", at, bit), ("field", kind, i, value) and
    ("swap", kind, i, kind, j) on the integer header fields; an op past the (truncated) end is skipped."""
    out = bytearray(seed.raw)
    for op in ops:
        if op[0] == "truncate":
            del out[op[1] :]
        elif op[0] == "flip" and op[1] < len(out):
            out[op[1]] ^= 1 << op[2]
        elif op[0] == "field":
            offset, size = seed.fields[op[1]][op[2] % len(seed.fields[op[1]])]
            if offset + size <= len(out):
                out[offset : offset + size] = (op[3] % 2 ** (8 * size)).to_bytes(size, "little")
        elif op[0] == "swap":
            a = seed.fields[op[1]][op[2] % len(seed.fields[op[1]])]
            b = seed.fields[op[3]][op[4] % len(seed.fields[op[3]])]
            if max(a[0] + a[1], b[0] + b[1]) <= len(out):
                va, vb = (
                    int.from_bytes(out[a[0] : a[0] + a[1]], "little"),
                    int.from_bytes(out[b[0] : b[0] + b[1]], "little"),
                )
                out[a[0] : a[0] + a[1]] = (vb % 2 ** (8 * a[1])).to_bytes(a[1], "little")
                out[b[0] : b[0] + b[1]] = (va % 2 ** (8 * b[1])).to_bytes(b[1], "little")
    return bytes(out)


def mutation_ops(seed: Seed) -> st.SearchStrategy[list[tuple]]:
    """1-3 ops; flips mostly in the header, field values mostly boundary values; each field kind equally likely."""
    n, kinds = len(seed.raw), sorted(seed.fields)
    value = st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))
    at = st.one_of(st.integers(0, seed.header_end - 1), st.integers(0, seed.header_end - 1), st.integers(0, n - 1))
    index = st.integers(0, 1 << 20)
    op = st.one_of(
        st.tuples(st.just("truncate"), st.one_of(st.integers(0, seed.header_end), st.integers(0, n - 1))),
        st.tuples(st.just("flip"), at, st.integers(0, 7)),
        st.tuples(st.just("field"), st.sampled_from(kinds), index, value),
        st.tuples(st.just("field"), st.sampled_from(kinds), index, value),
        st.tuples(st.just("swap"), st.sampled_from(kinds), index, st.sampled_from(kinds), index),
    )
    return st.lists(op, min_size=1, max_size=3)


def random_ops(rng: random.Random, seed: Seed, data_bias: float = 0.0) -> list[tuple]:
    """What `mutation_ops` draws, from a plain RNG (the native cases are generated before the sanitized child runs);
    `data_bias` is the share of bit flips aimed past the header, at tensor data that reaches the native engine."""
    ops: list[tuple] = []
    for _ in range(rng.randint(1, 3)):
        kind, choice = rng.choice(sorted(seed.fields)), rng.random()
        if choice < 0.1:
            ops.append(("truncate", rng.randrange(len(seed.raw))))
        elif choice < 0.5:
            header = rng.random() >= data_bias
            ops.append(("flip", rng.randrange(seed.header_end if header else len(seed.raw)), rng.randrange(8)))
        elif choice < 0.85:
            value = rng.choice(INTERESTING) if rng.random() < 0.7 else rng.randrange(2**64)
            ops.append(("field", kind, rng.randrange(1 << 20), value))
        else:
            ops.append(("swap", kind, rng.randrange(1 << 20), rng.choice(sorted(seed.fields)), rng.randrange(1 << 20)))
    return ops


# --- the readers' contract ------------------------------------------------------------------------------------------


class FuzzCrash(AssertionError):
    """A reader did something its contract does not allow; the input is saved."""


def save_crash(data: bytes, target: str, suffix: str) -> Path:
    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    path = CRASH_DIR / f"{target}-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    path.write_bytes(data)
    return path


def read_gguf(path: Path) -> None:
    """What the engine does with a file before the native engine sees it: the header checks, then every tensor
    mapped and the special tokens read."""
    file = ModelFile(path)
    for name, info in file.tensors.items():
        assert np.asarray(file.raw(name)).nbytes == info.n_bytes
    for key in (gguf.Keys.Tokenizer.BOS_ID, gguf.Keys.Tokenizer.EOS_ID):
        file.special_token(key)


def read_safetensors(path: Path) -> None:
    read_safetensors_header(path)


READERS = {".gguf": (read_gguf, GGUFFormatError), ".safetensors": (read_safetensors, CheckpointError)}


def check_input(data: bytes, work: Path, suffix: str) -> bool:
    """Run the reader for `suffix` on `data`; True if it accepted the file, False if it refused it as it should.
    Anything else (another exception, a hang) saves the input and raises FuzzCrash."""
    read, allowed = READERS[suffix]
    path = work / f"case{suffix}"
    path.unlink(missing_ok=True)  # a new file, never one rewritten under a mapping of the last case
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        read(path)
        accepted = True
    except allowed:
        accepted = False
    except Exception as exc:  # noqa: BLE001 - any other exception is what the harness is looking for
        saved = save_crash(data, suffix[1:], suffix)
        raise FuzzCrash(f"the {suffix[1:]} reader raised {exc!r} on an input saved to {saved}") from exc
    if time.perf_counter() - start > HANG_SECONDS:
        saved = save_crash(data, suffix[1:], suffix)
        raise FuzzCrash(
            f"the {suffix[1:]} reader took {time.perf_counter() - start:.1f} s on an input saved to {saved}"
        )
    return accepted


# --- counts in pytest's summary -------------------------------------------------------------------------------------


class FuzzReport:
    """The harness's case counts, written at the end of pytest's terminal summary (visible in `make test`)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int, float, str]] = []

    def add(self, target: str, cases: int, crashes: int, seconds: float, note: str = "") -> None:
        self.rows.append((target, cases, crashes, seconds, note))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        terminalreporter.write_sep("-", "fuzz harness (tests/test_fuzz_formats.py)")
        for target, cases, crashes, seconds, note in self.rows:
            terminalreporter.write_line(f"{target}: {cases:,} cases, {crashes} crashes, {seconds:.1f} s{note}")
        cases, crashes = sum(r[1] for r in self.rows), sum(r[2] for r in self.rows)
        terminalreporter.write_line(f"fuzz total: {cases:,} cases, {crashes} crashes")


@pytest.fixture(scope="session")
def fuzz_report(request) -> FuzzReport:
    plugin = request.config.pluginmanager.get_plugin("ryz-fuzz-report")
    if plugin is None:
        plugin = FuzzReport()
        request.config.pluginmanager.register(plugin, "ryz-fuzz-report")
    return plugin


class _Cases:
    """Counts one target's cases (Hypothesis's shrinking included) and reports them, crash or not."""

    def __init__(self, report: FuzzReport, target: str):
        self.report, self.target, self.n, self.note = report, target, 0, ""

    def __enter__(self) -> _Cases:
        self.start = time.perf_counter()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        crashed = int(kind is not None)
        self.report.add(self.target, self.n, crashed, time.perf_counter() - self.start, self.note)


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same cases on every run of `make test`
    database=None,  # a crash's input is saved by the harness itself
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


# --- seeds ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A real tiny model artifact, as `ryz quantize` writes it (tokenizer and chat template included)."""
    root = tmp_path_factory.mktemp("fuzz")
    path = root / "tiny.gguf"
    quantize_checkpoint(checkpoints.synth(root / "ckpt", seed=4), path)
    return path


@pytest.fixture(scope="module")
def gguf_file_seed(tiny_gguf) -> Seed:
    return gguf_seed(tiny_gguf.read_bytes())


# --- GGUF -----------------------------------------------------------------------------------------------------------


def test_the_seeds_are_accepted(tiny_gguf, tmp_path):
    assert check_input(tiny_gguf.read_bytes(), tmp_path, ".gguf")
    assert check_input(PACKED_SAFETENSORS.read_bytes(), tmp_path, ".safetensors")


def test_gguf_reader_under_byte_and_field_mutations(gguf_file_seed, tmp_path, fuzz_report):
    with _Cases(fuzz_report, "gguf reader, byte and field mutations (Hypothesis)") as cases:

        @FUZZ_SETTINGS
        @given(mutation_ops(gguf_file_seed))
        def case(ops):
            cases.n += 1
            check_input(apply_ops(gguf_file_seed, ops), tmp_path, ".gguf")

        case()


KEYS = [
    "general.architecture",
    "general.alignment",
    "ryz.schema",
    *(
        f"ryz-bitnet.{k}"
        for k in (
            "context_length",
            "embedding_length",
            "block_count",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.value_length",
            "rope.dimension_count",
            "rope.freq_base",
            "attention.layer_norm_rms_epsilon",
            "vocab_size",
            "ffn_activation",
        )
    ),
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.tokens",
]
_INT_RANGES = {0: (0, 2**8 - 1), 1: (-(2**7), 2**7 - 1), 2: (0, 2**16 - 1), 3: (-(2**15), 2**15 - 1)}
_INT_RANGES |= {4: (0, 2**32 - 1), 5: (-(2**31), 2**31 - 1), 10: (0, 2**64 - 1), 11: (-(2**63), 2**63 - 1)}


def gguf_values() -> st.SearchStrategy[tuple[int, object]]:
    """(value type, value) over every GGUF type, integers biased to boundaries, floats with NaN and infinities."""
    ints = [
        st.tuples(
            st.just(t),
            st.one_of(
                st.sampled_from([v for v in INTERESTING if lo <= v <= hi] + [lo, hi, -1 if lo < 0 else 0]),
                st.integers(lo, hi),
            ),
        )
        for t, (lo, hi) in _INT_RANGES.items()
    ]
    return st.one_of(
        *ints,
        st.tuples(st.just(6), st.floats(width=32)),
        st.tuples(st.just(12), st.floats()),
        st.tuples(st.just(7), st.booleans()),
        st.tuples(
            st.just(STRING), st.sampled_from(["", "silu", "relu2", "bitnet", "ryz-bitnet", "32"]) | st.text(max_size=8)
        ),
        st.tuples(st.just(ARRAY), st.tuples(st.just(4), st.lists(st.integers(0, 2**32 - 1), max_size=3))),
        st.tuples(st.just(ARRAY), st.tuples(st.just(STRING), st.lists(st.text(max_size=3), max_size=3))),
    )


def tensor_edits(names: list[str]) -> st.SearchStrategy[tuple]:
    dim = st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))
    return st.one_of(
        st.tuples(st.just("dims"), st.sampled_from(names), st.lists(dim, min_size=0, max_size=5)),
        st.tuples(
            st.just("type"), st.sampled_from(names), st.one_of(st.integers(0, 45), st.sampled_from(INTERESTING[:20]))
        ),
        st.tuples(
            st.just("offset"),
            st.sampled_from(names),
            st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1)),
        ),
        st.tuples(st.just("swap"), st.sampled_from(names), st.sampled_from(names), st.sampled_from([1, 2, 3])),
        st.tuples(st.just("drop"), st.sampled_from(names)),
    )


def test_gguf_reader_on_structured_metadata_and_tensor_infos(gguf_file_seed, tmp_path, fuzz_report):
    """Hypothesis draws whole fields: a metadata key the engine reads set to a value of any GGUF type, two values
    swapped, a tensor info's dims, type or offset set, two tensors' infos swapped, a tensor dropped."""
    base = parse_gguf(gguf_file_seed.raw)
    names = [t[0] for t in base.tensors]
    kv_edit = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(KEYS), gguf_values()),
        st.tuples(st.just("swap kv"), st.sampled_from(KEYS), st.sampled_from(KEYS)),
        st.tuples(st.just("drop kv"), st.sampled_from(KEYS)),
    )
    with _Cases(fuzz_report, "gguf reader, structured fields (Hypothesis)") as cases:

        @FUZZ_SETTINGS
        @given(st.lists(st.one_of(kv_edit, tensor_edits(names)), min_size=1, max_size=3))
        def case(edits):
            cases.n += 1
            parts = copy.deepcopy(base)
            for edit in edits:
                _edit_parts(parts, edit)
            check_input(parts.to_bytes(), tmp_path, ".gguf")

        case()


def _edit_parts(parts: GGUFParts, edit: tuple) -> None:
    kvs = {kv[0]: kv for kv in parts.kvs}
    tensors = {t[0]: t for t in parts.tensors}
    kind = edit[0]
    if kind == "set":
        parts.set_kv(edit[1], *edit[2])
    elif kind == "swap kv" and edit[1] in kvs and edit[2] in kvs:
        kvs[edit[1]][1:], kvs[edit[2]][1:] = kvs[edit[2]][1:], kvs[edit[1]][1:]
    elif kind == "drop kv" and edit[1] in kvs:
        parts.kvs.remove(kvs[edit[1]])
    elif kind in ("dims", "type", "offset") and edit[1] in tensors:
        tensors[edit[1]][{"dims": 1, "type": 2, "offset": 3}[kind]] = edit[2]
    elif kind == "swap" and edit[1] in tensors and edit[2] in tensors:
        a, b, i = tensors[edit[1]], tensors[edit[2]], edit[3]
        a[i], b[i] = b[i], a[i]
    elif kind == "drop" and edit[1] in tensors:
        parts.tensors.remove(tensors[edit[1]])


# --- safetensors ----------------------------------------------------------------------------------------------------


def test_safetensors_reader_under_byte_and_field_mutations(tmp_path, fuzz_report):
    seed = safetensors_seed(PACKED_SAFETENSORS.read_bytes())
    with _Cases(fuzz_report, "safetensors reader, byte and field mutations (Hypothesis)") as cases:

        @FUZZ_SETTINGS
        @given(mutation_ops(seed))
        def case(ops):
            cases.n += 1
            check_input(apply_ops(seed, ops), tmp_path, ".safetensors")

        case()


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INTERESTING),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=4),
)
json_values = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


def safetensors_entries() -> st.SearchStrategy[dict]:
    dtype = st.one_of(
        st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", ""]),
        json_values,
    )
    shape = st.one_of(
        st.lists(st.one_of(st.integers(-2, 2**40), st.sampled_from(INTERESTING)), max_size=4), json_values
    )
    offsets = st.one_of(
        st.lists(st.one_of(st.integers(-8, 2**20), st.sampled_from(INTERESTING)), min_size=2, max_size=2), json_values
    )
    return st.fixed_dictionaries({"dtype": dtype, "shape": shape, "data_offsets": offsets})


def test_safetensors_reader_on_structured_headers(tmp_path, fuzz_report):
    """Hypothesis draws headers: the packed checkpoint's with entries edited, swapped or added, and headers from
    scratch, over a data section of a drawn length; the JSON itself any shape (lists, nesting, NaN)."""
    raw = PACKED_SAFETENSORS.read_bytes()
    header_len = struct.unpack_from("<Q", raw)[0]
    real = json.loads(raw[8 : 8 + header_len])
    data = raw[8 + header_len :]
    names = [n for n in real if n != "__metadata__"]
    real_edit = st.one_of(
        st.tuples(
            st.just("set"), st.sampled_from(names), st.sampled_from(["dtype", "shape", "data_offsets"]), json_values
        ),
        st.tuples(st.just("entry"), st.sampled_from(names), safetensors_entries()),
        st.tuples(
            st.just("swap"),
            st.sampled_from(names),
            st.sampled_from(names),
            st.sampled_from(["dtype", "shape", "data_offsets"]),
        ),
    )
    scratch = st.tuples(
        st.dictionaries(st.text(max_size=4), safetensors_entries() | json_values, max_size=4), st.integers(0, 64)
    )
    with _Cases(fuzz_report, "safetensors reader, structured headers (Hypothesis)") as cases:

        @FUZZ_SETTINGS
        @given(st.one_of(st.lists(real_edit, min_size=1, max_size=3), scratch, json_values))
        def case(drawn):
            cases.n += 1
            if isinstance(drawn, list) and drawn and isinstance(drawn[0], tuple):
                header, body = copy.deepcopy(real), data
                for edit in drawn:
                    if edit[0] == "set":
                        header[edit[1]][edit[2]] = edit[3]
                    elif edit[0] == "entry":
                        header[edit[1]] = edit[2]
                    else:
                        header[edit[1]][edit[3]], header[edit[2]][edit[3]] = (
                            header[edit[2]][edit[3]],
                            header[edit[1]][edit[3]],
                        )
            elif isinstance(drawn, tuple):
                header, body = drawn[0], bytes(drawn[1])
            else:
                header, body = drawn, b""
            text = json.dumps(header).encode()
            check_input(struct.pack("<Q", len(text)) + text + body, tmp_path, ".safetensors")

        case()


# --- the native loader under ASan + UBSan ---------------------------------------------------------------------------

# GGML type -> (block, bytes per block) for the types the native engine reads.
_LAYOUTS = {0: (1, 4), 1: (1, 2), 8: (32, 34), 14: (256, 210), 34: (256, 54), 35: (256, 66)}
_HPARAM_FIELDS = ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab", "ffn_act", "sub_norms", "tied")


def _stored_bytes(type_id: int, rows: int, cols: int) -> int:
    block, size = _LAYOUTS.get(type_id, (1, 1))
    return max(rows, 0) * (max(cols, 0) // block) * size


ABI_EDITS: tuple[str, ...] = ("bytes", "shape", "shape+bytes", "type", "type+bytes", "drop", "twice", "rename")
ABI_EDITS += ("hparam", "scale", "blockscale")
BYTE_DELTAS = (-66, -65, -64, -4, -1, 1, 4, 64)
SIZES = (0, 1, -1, 2, 3, 4, 100, 256, 257, 512, 2**31, 2**40, 2**62)
TYPE_IDS = (0, 1, 2, 8, 14, 34, 35, 99, -1)
HPARAM_VALUES = (0, -1, 1, 2, 3, 5, 63, 64, 128, 255, 256, 257, 512, 2**31 - 1)
SCALE_FORMS = ("1x0", "1x2", "2x1", "f16", "nan", "inf", "0")


def abi_case(rng: random.Random, names: list[str]) -> list[list]:
    """1-2 edits of a correct registration of the seed model: [what, tensor name or hparam field, values...]."""
    scales = [n for n in names if n.endswith(".scale")]
    weights = [n for n in names if n.startswith("blk.") and n.endswith(".weight")]
    edits = []
    for _ in range(rng.randint(1, 2)):
        what, name = rng.choice(ABI_EDITS), rng.choice(names)
        if what == "bytes":
            edits.append([what, name, rng.choice(BYTE_DELTAS)])
        elif what.startswith("shape"):
            edits.append([what, name, rng.choice(SIZES), rng.choice([0, 1])])  # rows (1) or cols (0)
        elif what.startswith("type"):
            edits.append([what, name, rng.choice(TYPE_IDS)])
        elif what == "rename":
            edits.append([what, name, rng.choice(names)])
        elif what == "hparam":
            edits.append([what, rng.choice((*_HPARAM_FIELDS, "rope_theta", "rms_eps")), rng.choice(HPARAM_VALUES)])
        elif what == "scale":
            edits.append([what, rng.choice(scales), rng.choice(SCALE_FORMS)])
        elif what == "blockscale":
            edits.append([what, rng.choice(weights), rng.randrange(1 << 16)])
        else:
            edits.append([what, name])
    return edits


def _load_exact(lib: Library, libc, file: ModelFile, edits: list[list]) -> str:
    """Register every tensor of `file` (with `edits`) from malloc'd copies of exactly the declared length, finalize,
    and run one token; what happened, as a short label. Only a sanitizer report or a signal is a failure."""
    hp = hparams_struct(file.hparams)
    for what, target, *args in edits:
        if what == "hparam":
            setattr(hp, target, float(args[0]) if target in ("rope_theta", "rms_eps") else args[0])
    handle = ctypes.c_void_p()
    if lib.lib.ryz_model_new(ctypes.byref(hp), ctypes.byref(handle)):
        return "refused: model_new"
    buffers: list[int] = []
    try:
        registrations: list[list[Any]] = []  # [name, data, n_bytes, type, rows, cols]
        for name in file.tensors:
            data = bytes(np.ascontiguousarray(file.raw(name)).view(np.uint8).reshape(-1))
            shape = file.shape(name)
            rows, cols = (1, shape[0]) if len(shape) == 1 else shape
            registrations.append([name, data, len(data), GGML_TYPE_IDS[file.tensor_type(name)], rows, cols])
        for what, target, *args in edits:
            regs = [r for r in registrations if r[0] == target]
            if not regs:
                continue
            r = regs[0]
            if what == "bytes":
                r[2] = max(0, r[2] + args[0])
            elif what.startswith("shape"):
                r[4 if args[1] else 5] = args[0]
                if what == "shape+bytes":
                    r[2] = _stored_bytes(r[3], r[4], r[5])
            elif what.startswith("type"):
                r[3] = args[0]
                if what == "type+bytes":
                    r[2] = _stored_bytes(r[3], r[4], r[5])
            elif what == "drop":
                registrations.remove(r)
            elif what == "twice":
                registrations.append(list(r))
            elif what == "rename":
                r[0] = args[0]
            elif what == "scale":
                value = {"nan": math.nan, "inf": math.inf, "0": 0.0}.get(args[0], 1.0)
                r[1] = struct.pack("<2f", value, value)
                r[3:] = {"1x0": [0, 1, 0], "1x2": [0, 1, 2], "2x1": [0, 2, 1], "f16": [1, 1, 2]}.get(args[0], [0, 1, 1])
                r[2] = _stored_bytes(r[3], r[4], r[5])
            elif what == "blockscale":
                block = bytearray(r[1])
                stride = 66 if r[3] == 35 else 54
                at = (args[0] * stride) % max(len(block) - stride, 1) // stride * stride + stride - 2
                block[at : at + 2] = struct.pack("<H", args[0])
                r[1] = bytes(block)
        for name, data, n_bytes, type_id, rows, cols in registrations:
            if n_bytes > 1 << 30:
                continue  # a declared length no test machine can allocate: nothing to learn about reads
            ptr = libc.malloc(n_bytes)
            buffers.append(ptr)
            ctypes.memset(ptr, 0, n_bytes)
            ctypes.memmove(ptr, data, min(n_bytes, len(data)))
            status = lib.lib.ryz_model_set_tensor(handle, name.encode(), ptr, n_bytes, type_id, rows, cols)
            if status:
                return "refused: set_tensor"
        if lib.lib.ryz_model_finalize(handle, 2):
            return "refused: finalize"
        context = ctypes.c_void_p()
        if lib.lib.ryz_context_new(handle, 1, 1, 8, 1, ctypes.byref(context)):
            return "refused: context_new"
        try:
            tokens, seqs = (ctypes.c_int32 * 2)(1, 2), (ctypes.c_int32 * 2)(0, 0)
            logits = (ctypes.c_float * (2 * hp.vocab))()  # finalize checked vocab against the embedding
            want = (ctypes.c_uint8 * 2)(1, 1)
            status = lib.lib.ryz_forward(context, 2, tokens, seqs, want, logits)
            return "refused: forward" if status else "ran"
        finally:
            lib.lib.ryz_context_free(context)
    finally:
        lib.lib.ryz_model_free(handle)
        for ptr in buffers:
            libc.free(ptr)


def native_child(spec_path: str) -> None:
    """The sanitized child: every case of the spec, the case in progress written to its progress file first (a
    sanitizer report ends the process there), the outcome counts printed as the last line."""
    spec = json.loads(Path(spec_path).read_text())
    lib = Library(spec["library"])
    libc = ctypes.CDLL(None)  # with libasan preloaded, its malloc: every buffer gets redzones
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    progress = Path(spec["progress"])
    outcomes: Counter[str] = Counter()
    for path in spec["files"]:
        progress.write_text(json.dumps({"file": path}))
        try:
            file = ModelFile(path)
        except GGUFFormatError:
            outcomes["file refused by ModelFile"] += 1
            continue
        outcomes[f"file {_load_exact(lib, libc, file, [])}"] += 1
    seed = ModelFile(spec["files"][0])
    for edits in spec["abi_cases"]:
        progress.write_text(json.dumps({"abi": edits}))
        outcomes[f"abi {_load_exact(lib, libc, seed, edits)}"] += 1
    progress.write_text(json.dumps({"done": True}))
    print(json.dumps(dict(outcomes)))


def _asan_runtime(compiler: str) -> str | None:
    """The ASan runtime the sanitizer build links (GCC's libasan.so), to preload into the child Python."""
    try:
        out = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized_build():
    """The kernels' RYZ_SANITIZE=ON build (its own key, cached per machine; tests/test_native_kernels.py runs its
    kernel suite)."""
    try:
        return build_kernels(settings=Settings(), sanitize=True, progress=lambda message: None)
    except ToolchainNotFoundError as exc:
        pytest.skip(f"cannot build the native kernels: {exc}")


def test_native_loader_under_sanitizers(tiny_gguf, gguf_file_seed, sanitized_build, tmp_path, fuzz_report):
    runtime = _asan_runtime(sanitized_build.manifest["compiler"]["path"])
    if runtime is None:
        pytest.skip("no libasan.so to preload next to this compiler (a Clang build links its own runtime statically)")
    rng = random.Random(1616)
    files = [str(tiny_gguf)]
    for i in range(NATIVE_FILES):
        path = tmp_path / f"mutant-{i}.gguf"
        path.write_bytes(apply_ops(gguf_file_seed, random_ops(rng, gguf_file_seed, data_bias=0.6)))
        files.append(str(path))
    names = list(ModelFile(tiny_gguf).tensors)
    spec = {
        "library": str(sanitized_build.path),
        "files": files,
        "abi_cases": [abi_case(rng, names) for _ in range(NATIVE_ABI_CASES)],
        "progress": str(tmp_path / "progress.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "LD_PRELOAD": runtime,
        # Python itself is not instrumented and keeps memory to its exit: leaks are not what this looks for.
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }
    with _Cases(fuzz_report, "native loader under ASan + UBSan (files and C ABI cases)") as cases:
        cases.n = len(files) + len(spec["abi_cases"])
        proc = subprocess.run(
            [sys.executable, "-m", "tests.test_fuzz_formats", "native", str(tmp_path / "spec.json")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        report = proc.stderr[-6000:]
        if proc.returncode != 0 or "runtime error" in proc.stderr or "AddressSanitizer" in proc.stderr:
            last = json.loads((tmp_path / "progress.json").read_text() or "{}")
            if "file" in last:
                saved = save_crash(Path(last["file"]).read_bytes(), "native", ".gguf")
            else:
                saved = save_crash(json.dumps(last).encode(), "native-abi", ".json")
                shutil.copyfile(tiny_gguf, saved.with_suffix(".seed.gguf"))
            raise FuzzCrash(
                f"the native loader failed (exit {proc.returncode}) on the case saved to {saved}:\n{report}"
            )
        outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
        cases.note = " (" + ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items())) + ")"
    # some cases of each kind got through to a forward, and every case ran
    assert outcomes.get("file ran", 0) >= 1 and outcomes.get("abi ran", 0) >= 1, outcomes
    assert sum(outcomes.values()) == cases.n


# --- atheris (make fuzz) --------------------------------------------------------------------------------------------


def atheris_main(target: str, seconds: int) -> None:
    """Coverage-guided runs of one reader with atheris (libFuzzer): seeded with the real small files, crashes written
    to CRASH_DIR by libFuzzer itself."""
    import atheris  # not a dev dependency: `make fuzz` installs it where a wheel exists

    suffix = {"gguf": ".gguf", "safetensors": ".safetensors"}[target]
    work = Path(tempfile.mkdtemp(prefix=f"ryz-fuzz-{target}-"))  # where each input is written for the reader
    corpus = CORPUS_DIR / target  # kept between runs: a longer `make fuzz` starts where the last one stopped
    corpus.mkdir(parents=True, exist_ok=True)
    if target == "gguf":  # a small real model (one layer, no tokenizer): mutations land in the header more often
        write_tuning_model(corpus / "seed.gguf", TuneShape(256, 4, 2, 64, 256), layers=1)
    else:
        shutil.copyfile(PACKED_SAFETENSORS, corpus / "seed.safetensors")
    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    for module in (ggufio, checkpoint):  # coverage of the readers only (instrument_all takes minutes)
        for value in vars(module).values():
            owned = [value, *vars(value).values()] if inspect.isclass(value) else [value]
            for fn in owned:
                if inspect.isfunction(fn) and fn.__module__ == module.__name__:
                    atheris.instrument_func(fn)

    def one_input(data: bytes) -> None:
        check_input(data, work, suffix)

    max_len = max(p.stat().st_size for p in corpus.iterdir()) + 4096
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={seconds}",
            f"-max_len={max_len}",
            "-timeout=20",
            f"-artifact_prefix={CRASH_DIR}/{target}-",
            str(corpus),
        ],
        one_input,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    if sys.argv[1] == "native":
        native_child(sys.argv[2])
    elif sys.argv[1] == "atheris":
        atheris_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m tests.test_fuzz_formats native SPEC | atheris gguf|safetensors SECONDS")
