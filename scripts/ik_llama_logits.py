"""Every position's logits for a token list from ik_llama.cpp, through the ctypes bindings of the
ik-llama-cpp-python sdist over its vendored ik_llama.cpp built by `make check-ik-llama` (build/ik-llama).

Run in its own process: ik_llama.cpp's libllama/libggml share their sonames with llama-cpp-python's, so both
cannot live in one process.

    python scripts/ik_llama_logits.py MODEL.gguf OUT.npy 256,84,104,...  [--build build/ik-llama] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

SDIST = "ik_llama_cpp_python-0.1.5"


def library_path(build: Path) -> Path:
    return build / "cmake" / "src" / "libllama.so"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path, help="where to save the (tokens, vocab) float32 logits (.npy)")
    parser.add_argument("tokens", help="comma-separated token ids")
    parser.add_argument("--build", type=Path, default=Path(__file__).resolve().parents[1] / "build" / "ik-llama")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    lib = library_path(args.build)
    if not lib.is_file():
        print(f"{lib} does not exist: build it with `make check-ik-llama`", file=sys.stderr)
        return 2
    os.environ["IK_LLAMA_CPP_LIB_PATH"] = str(lib)  # read by the bindings' loader at import
    sys.path.insert(0, str(args.build / SDIST))
    from ik_llama_cpp import _ctypes_api as C  # after the path and variable above
    from ik_llama_cpp._internals import IkContext, IkModel, make_batch_range

    tokens = [int(t) for t in args.tokens.split(",")]
    model = IkModel(str(args.model))
    ctx = IkContext(model, n_ctx=128, n_threads=args.threads, flash_attn=False)
    batch = make_batch_range(tokens, pos_start=0, logits_last=False)
    for i in range(len(tokens)):
        batch.logits[i] = 1
    try:
        if ctx.decode(batch) != 0:
            print("llama_decode failed", file=sys.stderr)
            return 1
        logits = np.stack(
            [np.ctypeslib.as_array(ctx.get_logits(i), shape=(model.n_vocab,)).copy() for i in range(len(tokens))]
        )
    finally:
        C.llama_batch_free(batch)
        ctx.close()
        model.close()
    np.save(args.out, logits.astype(np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
