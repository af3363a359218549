"""ctypes binding of the native engine (native/include/ryz.h). The only module that loads the library.

`NativeModel` has the reference's interface (`forward(tokens, cache)`, `generate`), so tests and the
lm-eval adapter can switch between them; `load_library` finds or builds the kernel build for this CPU.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import RyzError
from engine.model.ggufio import LINEAR_NAMES, Hyperparams, ModelFile, tensor_name
from engine.model.reference import greedy_decode

# The ABI this engine is written for, and the older ones it still drives: a serving bundle carries its own kernel
# build, so a bundle made before ABI 4 keeps serving on this engine. ABI 4 gave ryz_model_set_tensor the byte length
# of the tensor's data (checked against its type and shape); an ABI 3 library takes none, and the checks before it
# (ModelFile's validation of the file) are what stand between a crafted file and it. ABI 5 only adds symbols
# (_ABI_5_SIGNATURES), looked up when the library has them.
ABI_VERSION = 5
COMPATIBLE_ABIS = (3, 4, 5)
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q8_0": 8, "q6_k": 14, "tq1_0": 34, "tq2_0": 35}
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "neon": 3, "amx": 4}  # amx: ABI 5 libraries
ISA_NAMES = {v: k for k, v in ISAS.items()}
KV_TYPES = {"f32": 0, "f16": 1}
KV_ELEMENT_BYTES = {"f32": 4, "f16": 2}
_STATUS = {1: "invalid argument", 2: "out of memory", 3: "unsupported", 4: "capacity exceeded", 5: "wrong call order"}


def kv_bytes_per_position(hp, kv_type: str = "f16") -> int:
    """Keys and values of every layer for one position of one sequence."""
    return 2 * hp.layers * hp.kv_heads * hp.head_dim * KV_ELEMENT_BYTES[kv_type]


class NativeError(RyzError, RuntimeError):
    """A native call failed; the message is the library's own (ryz_last_error)."""


class NativeCapacityError(NativeError):
    """A sequence would exceed the context's positions."""


class _Hparams(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int32),
        ("layers", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("ffn", ctypes.c_int32),
        ("vocab", ctypes.c_int32),
        ("rope_theta", ctypes.c_float),
        ("rms_eps", ctypes.c_float),
        ("ffn_act", ctypes.c_int32),
        ("sub_norms", ctypes.c_int32),
        ("tied", ctypes.c_int32),
    ]


def hparams_struct(hp: Hyperparams) -> _Hparams:
    """The C ABI's ryz_hparams for a model file's hyperparameters."""
    return _Hparams(
        hp.hidden,
        hp.layers,
        hp.heads,
        hp.kv_heads,
        hp.head_dim,
        hp.ffn,
        hp.vocab,
        hp.rope_theta,
        hp.rms_eps,
        1 if hp.ffn_act == "relu2" else 0,
        int(hp.sub_norms),
        int(hp.tied),
    )


class _Tuning(ctypes.Structure):
    _fields_ = [("gemm_token_tile", ctypes.c_int32), ("rows_per_task", ctypes.c_int32)]


_P = ctypes.c_void_p
_I32, _I64, _F32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "ryz_abi_version": (_I32, []),
    "ryz_isa": (_I32, []),
    "ryz_isa_name": (ctypes.c_char_p, [_I32]),
    "ryz_isa_supported": (_I32, [_I32]),
    "ryz_set_isa": (_I32, [_I32]),
    "ryz_last_error": (ctypes.c_char_p, []),
    "ryz_source_hash": (ctypes.c_char_p, []),
    "ryz_model_new": (_I32, [ctypes.POINTER(_Hparams), ctypes.POINTER(_P)]),
    "ryz_model_set_tensor": (_I32, [_P, ctypes.c_char_p, _P, ctypes.c_size_t, _I32, _I64, _I64]),
    "ryz_model_finalize": (_I32, [_P, _I32]),
    "ryz_model_repack_seconds": (ctypes.c_double, [_P]),
    "ryz_model_repacked_bytes": (_I64, [_P]),
    "ryz_model_free": (None, [_P]),
    "ryz_context_new": (_I32, [_P, _I32, _I32, _I32, _I32, ctypes.POINTER(_P)]),
    "ryz_context_free": (None, [_P]),
    "ryz_context_set_tuning": (_I32, [_P, ctypes.POINTER(_Tuning)]),
    "ryz_seq_length": (_I32, [_P, _I32]),
    "ryz_seq_truncate": (_I32, [_P, _I32, _I32]),
    "ryz_seq_copy": (_I32, [_P, _I32, _I32, _I32]),
    "ryz_seq_release": (_I32, [_P, _I32]),
    "ryz_context_kv_bytes": (_I64, [_P]),
    "ryz_forward": (_I32, [_P, _I32, _P, _P, _P, _P]),
    "ryz_ternary_packed_bytes": (ctypes.c_size_t, [_I64, _I64]),
    "ryz_ternary_pack": (_I32, [_P, _I32, _I64, _I64, _P]),
    "ryz_ternary_gemm": (_I32, [_P, _I64, _I64, _P, _I32, _P]),
    "ryz_ternary_gemm_tiled": (_I32, [_P, _I64, _I64, _P, _I32, _I32, _P]),
    "ryz_quantize_activations": (_I32, [_P, _I32, _I64, _P, _P, _P]),
    "ryz_dense_gemm": (_I32, [_P, _I32, _I64, _I64, _P, _I32, _P]),
    "ryz_kv_dot": (_I32, [_P, _P, _I32, _I64, _I32, _I32, _P]),
    "ryz_kv_axpy": (_I32, [_P, _P, _I32, _I64, _I32, _I32, _P]),
    "ryz_top_k": (_I32, [_P, _I64, _I32, _P, _P]),
    "ryz_read_bandwidth": (ctypes.c_double, [_I64, _I32, _I32]),
}
_ABI_3_SIGNATURES = {"ryz_model_set_tensor": (_I32, [_P, ctypes.c_char_p, _P, _I32, _I64, _I64])}  # no byte length
_ABI_5_SIGNATURES: dict = {  # symbols added in ABI 5 (declared only when the library is ABI 5 or later)
    "ryz_context_set_profiling": (_I32, [_P, _I32]),
    "ryz_context_profile": (_I32, [_P, _P, _P]),
    # the ternary layouts (RYZ_LAYOUT_T2P = 0, RYZ_LAYOUT_T1P = 1): bytes, pack with dst length, GEMM with packed length
    "ryz_ternary_layout_bytes": (ctypes.c_size_t, [_I32, _I64, _I64]),
    "ryz_ternary_pack_layout": (_I32, [_P, _I32, _I32, _I64, _I64, _P, ctypes.c_size_t]),
    "ryz_ternary_gemm_layout": (_I32, [_I32, _P, ctypes.c_size_t, _I64, _I64, _P, _I32, _I32, _P]),
    # the GQA attention kernels: nq queries (arrays of pointers) over the same KV rows
    "ryz_kv_dot_multi": (_I32, [_P, _I32, _P, _I32, _I64, _I32, _I32, _P]),
    "ryz_kv_axpy_multi": (_I32, [_P, _I32, _P, _P, _I32, _I64, _I32, _P]),
}
TERNARY_LAYOUTS = {"t2p": 0, "t1p": 1}  # RYZ_LAYOUT_*
PROFILE_PARTS = ("ternary_linears", "head", "attention", "other")  # RYZ_PART_* order


class Library:
    """The loaded shared library with every symbol's signature declared and status codes checked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise NativeError(
                f"cannot load the native library {self.path}: {exc}; rebuild it with `ryz build-kernels --force`"
            ) from None
        # The version first: a library of another ABI may lack symbols, or have them with other signatures.
        try:
            version = self.lib.ryz_abi_version
        except AttributeError:
            raise NativeError(f"{self.path} is not a Ryzanstein kernel library (no ryz_abi_version)") from None
        version.restype, version.argtypes = _I32, []
        self.abi: int = version()
        if self.abi not in COMPATIBLE_ABIS:
            raise NativeError(
                f"{self.path} has ABI {self.abi}, but this engine runs ABI {ABI_VERSION} libraries (and ABI 3 and 4 "
                "ones, from older serving bundles): rebuild it with `ryz build-kernels --force`, or a bundle's with "
                "`ryz bundle REF -o DIR` on this Ryzanstein"
            )
        signatures = {
            **_SIGNATURES,
            **(_ABI_3_SIGNATURES if self.abi == 3 else {}),
            **(_ABI_5_SIGNATURES if self.abi >= 5 else {}),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes

    def check(self, status: int, what: str) -> None:
        if status == 0:
            return
        message = (self.lib.ryz_last_error() or b"").decode() or _STATUS.get(status, f"status {status}")
        cls = NativeCapacityError if status == 4 else NativeError
        raise cls(f"{what}: {message}")

    def set_tensor(self, model, name: str, data: np.ndarray, qtype: str, rows: int, cols: int) -> None:
        """Register one tensor of a model being built; `data` (C-contiguous) must stay alive as long as the model."""
        args = (model, name.encode(), data.ctypes.data) + ((data.nbytes,) if self.abi >= 4 else ())
        self.check(self.lib.ryz_model_set_tensor(*args, GGML_TYPE_IDS[qtype], rows, cols), name)

    @property
    def isa(self) -> str:
        return ISA_NAMES[self.lib.ryz_isa()]

    def isa_supported(self, isa: str) -> bool:
        return bool(self.lib.ryz_isa_supported(ISAS[isa]))

    def set_isa(self, isa: str) -> None:
        if isa == "auto":
            for name in ("amx", "avx512", "avx2", "neon", "scalar"):
                if self.isa_supported(name):
                    isa = name
                    break
        if isa not in ISAS:
            raise ValueError(f"unknown ISA {isa!r}; choose auto, {', '.join(ISAS)}")
        self.check(self.lib.ryz_set_isa(ISAS[isa]), f"RYZ_ISA={isa}")

    # Kernel entry points (tests, autotuner).
    def ternary_pack(self, raw: np.ndarray, qtype: str, rows: int, cols: int) -> np.ndarray:
        out = np.zeros(self.lib.ryz_ternary_packed_bytes(rows, cols), dtype=np.uint8)
        raw = np.ascontiguousarray(raw)
        self.check(
            self.lib.ryz_ternary_pack(raw.ctypes.data, GGML_TYPE_IDS[qtype], rows, cols, out.ctypes.data),
            "ternary_pack",
        )
        return out

    def ternary_gemm(
        self, packed: np.ndarray, rows: int, cols: int, act: np.ndarray, token_tile: int = 0
    ) -> np.ndarray:
        act = np.ascontiguousarray(act, dtype=np.int8).reshape(-1, cols)
        out = np.zeros((act.shape[0], rows), dtype=np.int32)
        self.check(
            self.lib.ryz_ternary_gemm_tiled(
                packed.ctypes.data, rows, cols, act.ctypes.data, act.shape[0], token_tile, out.ctypes.data
            ),
            "ternary_gemm",
        )
        return out

    def quantize_activations(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        q = np.zeros(x.shape, dtype=np.int8)
        scale = np.zeros(x.shape[0], dtype=np.float32)
        sums = np.zeros(x.shape[0], dtype=np.int32)
        self.check(
            self.lib.ryz_quantize_activations(
                x.ctypes.data, x.shape[0], x.shape[1], q.ctypes.data, scale.ctypes.data, sums.ctypes.data
            ),
            "quantize_activations",
        )
        return q, scale, sums

    def dense_gemm(self, raw: np.ndarray, qtype: str, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(raw)
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, cols)
        out = np.zeros((x.shape[0], rows), dtype=np.float32)
        self.check(
            self.lib.ryz_dense_gemm(
                raw.ctypes.data, GGML_TYPE_IDS[qtype], rows, cols, x.ctypes.data, x.shape[0], out.ctypes.data
            ),
            "dense_gemm",
        )
        return out

    def top_k(self, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest values and their ids, largest first (ties: lower id first)."""
        logits = np.ascontiguousarray(logits, dtype=np.float32).ravel()
        ids, values = np.zeros(k, np.int32), np.zeros(k, np.float32)
        self.check(self.lib.ryz_top_k(logits.ctypes.data, logits.size, k, ids.ctypes.data, values.ctypes.data), "top_k")
        return ids, values

    def read_bandwidth(self, nbytes: int, threads: int, repeats: int = 3) -> float:
        """GB/s streamed with SIMD loads (best of `repeats`)."""
        return float(self.lib.ryz_read_bandwidth(nbytes, threads, repeats))


@dataclass
class NativeCache:
    """A sequence slot in a NativeModel's context (the reference's KVCache counterpart)."""

    seq: int
    model: NativeModel

    @property
    def length(self) -> int:
        return self.model.library.lib.ryz_seq_length(self.model.context, self.seq)


class NativeModel:
    """A GGUF model artifact on the native engine: mmap'd tensors, the head in huge pages, repacked ternary weights."""

    def __init__(
        self,
        path: str | Path,
        library: Library,
        threads: int = 1,
        max_seqs: int = 1,
        max_positions: int | None = None,
        kv_type: str = "f16",
        token_tile: int = 0,
        file: ModelFile | None = None,
    ):
        self.library = library
        self.file = file or ModelFile(path)  # a loader that read the file already passes it (engine/model/loader.py)
        self.hp = hp = self.file.hparams
        lib = library.lib
        handle = _P()
        library.check(lib.ryz_model_new(ctypes.byref(hparams_struct(hp)), ctypes.byref(handle)), "model_new")
        self.model: ctypes.c_void_p | None = handle  # None once closed
        self.context: ctypes.c_void_p | None = _P()
        self._arrays = []  # keep every mapped array alive as long as the native model points into it
        try:
            # The head is streamed whole every token: it gets its own huge pages (read in below); the rest is
            # mapped (finalize repacks the ternary weights, norms are small, embedding rows are looked up).
            head_name = "token_embd.weight" if hp.tied else "output.weight"
            head = self._head = self.file.allocate_resident(head_name)
            for name in self._tensor_names():
                data = head if name == head_name else np.ascontiguousarray(self.file.raw(name))
                shape = self.file.shape(name)
                rows, cols = (1, shape[0]) if len(shape) == 1 else shape
                self._arrays.append(data)
                library.set_tensor(handle, name, data, self.file.tensor_type(name), rows, cols)
            library.check(lib.ryz_model_finalize(handle, max(threads, 1)), "model_finalize")
            # The repacked copies are what runs: release the file's ternary pages (about 0.5 GB on 2B4T).
            self.file.release([tensor_name(i, stem) for i in range(hp.layers) for stem in LINEAR_NAMES.values()])
            self.file.read_into(head_name, head)  # after the release: the peak RSS holds the head or those pages
            ctx = _P()
            positions = max_positions or hp.context
            library.check(
                lib.ryz_context_new(handle, max(threads, 1), max_seqs, positions, KV_TYPES[kv_type], ctypes.byref(ctx)),
                "context_new",
            )
            self.context = ctx
            if token_tile:
                library.check(lib.ryz_context_set_tuning(ctx, ctypes.byref(_Tuning(token_tile, 0))), "set_tuning")
        except BaseException:
            self.close()
            raise
        self.max_seqs, self.max_positions, self.kv_type = max_seqs, positions, kv_type
        self.repack_seconds = lib.ryz_model_repack_seconds(handle)

    def _tensor_names(self) -> list[str]:
        names = ["token_embd.weight", "output_norm.weight"] + ([] if self.hp.tied else ["output.weight"])
        for i in range(self.hp.layers):
            names += [tensor_name(i, s) for s in ("attn_norm", "ffn_norm")]
            if self.hp.sub_norms:
                names += [tensor_name(i, s) for s in ("attn_sub_norm", "ffn_sub_norm")]
            for stem in LINEAR_NAMES.values():
                names.append(tensor_name(i, stem))
                if tensor_name(i, stem, "scale") in self.file.tensors:
                    names.append(tensor_name(i, stem, "scale"))
        return names

    def close(self) -> None:
        lib = self.library.lib
        if getattr(self, "context", None):
            lib.ryz_context_free(self.context)
            self.context = None
        if getattr(self, "model", None):
            lib.ryz_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def new_cache(self, seq: int = 0) -> NativeCache:
        self.library.check(self.library.lib.ryz_seq_truncate(self.context, seq, 0), "seq_truncate")
        return NativeCache(seq, self)

    def seq_length(self, seq: int) -> int:
        return self.library.lib.ryz_seq_length(self.context, seq)

    def truncate_seq(self, seq: int, length: int) -> None:
        self.library.check(self.library.lib.ryz_seq_truncate(self.context, seq, length), "seq_truncate")

    def copy_seq(self, src: int, dst: int, length: int) -> None:
        """dst's KV becomes the first `length` positions of src's (shared-prefix reuse)."""
        self.library.check(self.library.lib.ryz_seq_copy(self.context, src, dst, length), "seq_copy")

    def release_seq(self, seq: int) -> None:
        """Free the slot's KV memory; the next forward on it allocates again."""
        self.library.check(self.library.lib.ryz_seq_release(self.context, seq), "seq_release")

    def kv_bytes(self) -> int:
        """KV memory currently allocated over all sequence slots."""
        return self.library.lib.ryz_context_kv_bytes(self.context)

    @property
    def kv_bytes_per_seq(self) -> int:
        """What one slot allocates on first use (keys + values for every position)."""
        return kv_bytes_per_position(self.hp, self.kv_type) * self.max_positions

    @property
    def repacked_bytes(self) -> int:
        """Bytes of the repacked ternary weights: what the ternary linears read per forward call."""
        return int(self.library.lib.ryz_model_repacked_bytes(self.model))

    @property
    def can_profile(self) -> bool:
        return self.library.abi >= 5

    def set_profiling(self, on: bool) -> None:
        """Turn per-part timing of forward calls on or off (either resets it); needs an ABI 5 library."""
        if not self.can_profile:
            raise NativeError(f"{self.library.path} (ABI {self.library.abi}) cannot profile; rebuild the kernels")
        self.library.check(self.library.lib.ryz_context_set_profiling(self.context, int(on)), "set_profiling")

    def profile(self) -> dict:
        """Wall seconds per part (PROFILE_PARTS) summed over the forward calls since profiling was turned on."""
        seconds, calls = (ctypes.c_double * len(PROFILE_PARTS))(), ctypes.c_int64()
        self.library.check(
            self.library.lib.ryz_context_profile(self.context, ctypes.byref(seconds), ctypes.byref(calls)), "profile"
        )
        return {"calls": calls.value, "seconds": dict(zip(PROFILE_PARTS, (float(v) for v in seconds)))}

    def forward_batch(
        self, tokens: np.ndarray, seq_ids: np.ndarray, want_logits: np.ndarray | None = None
    ) -> np.ndarray:
        """One step over tokens of any sequences; logits for the selected tokens (default: the last)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        seq_ids = np.ascontiguousarray(seq_ids, dtype=np.int32)
        if want_logits is None:
            n_out = 1
            want_ptr = None
        else:
            want = np.ascontiguousarray(want_logits, dtype=np.uint8)
            if want.shape != tokens.shape:
                raise ValueError(f"want_logits has {want.size} entries for {tokens.size} tokens; give one per token")
            n_out = int(np.count_nonzero(want))  # as the forward counts them: any nonzero entry is one row
            want_ptr = want.ctypes.data
        # Not zeroed: the forward writes every row it returns (a 4 MB memset per 8-sequence decode step, 128 MB for
        # a full scoring batch, was pure overhead).
        logits = np.empty((max(n_out, 1), self.hp.vocab), dtype=np.float32)
        self.library.check(
            self.library.lib.ryz_forward(
                self.context, len(tokens), tokens.ctypes.data, seq_ids.ctypes.data, want_ptr, logits.ctypes.data
            ),
            "forward",
        )
        return logits[:n_out]

    def forward(self, tokens, cache: NativeCache | None = None) -> np.ndarray:
        """Logits (len(tokens), vocab) for `tokens` after what `cache` holds, as ReferenceModel.forward."""
        cache = cache if cache is not None else self.new_cache()
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.size == 0:
            raise ValueError("forward needs at least one token")
        return self.forward_batch(tokens, np.full(len(tokens), cache.seq, np.int32), np.ones(len(tokens), np.uint8))

    def generate(self, prompt: list[int], max_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        seq = self.new_cache().seq
        tokens = np.asarray(prompt, dtype=np.int32)
        first = self.forward_batch(tokens, np.full(len(tokens), seq, np.int32))[-1]
        step = lambda token: self.forward_batch(np.array([token], np.int32), np.array([seq], np.int32))[-1]  # noqa: E731
        return greedy_decode(first, step, max_tokens, stop_ids)
