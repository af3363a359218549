#!/usr/bin/env python3
"""Assemble the retrieval benchmark's corpus: the Python standard library and a few installed packages'
sources and docs, copied (without __pycache__) into one directory outside any git checkout.

    python scripts/index_corpus.py [-o /tmp/ryz-index-corpus] [--packages prefect,pandas,...] [--stdlib DIR]

With the defaults this is the 112,584-chunk corpus of docs/benchmarks.md ("Retrieval index"); the
record built it in stages (stdlib + prefect, then + pandas, + sqlalchemy + numpy, + networkx + dask),
`ryz index build` re-indexing only the new files each time. Copies only; embeds nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sysconfig
from pathlib import Path

PACKAGES = "prefect,pandas,sqlalchemy,numpy,networkx,dask"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"package {name!r} is not installed in this environment: pip install {name}, or drop it from --packages"
        )
    return Path(list(spec.submodule_search_locations)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default="/tmp/ryz-index-corpus", help="target directory (must not exist)")
    parser.add_argument("--packages", default=PACKAGES, help=f"comma-separated installed packages (default {PACKAGES})")
    parser.add_argument(
        "--stdlib",
        default=sysconfig.get_paths()["stdlib"],
        help="standard library directory (default this interpreter's; the record used Debian's /usr/lib/python3.11)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose another --out or remove it")
    ignore = shutil.ignore_patterns("__pycache__", "site-packages", "dist-packages")
    sources = {"stdlib": Path(args.stdlib)}
    sources.update({name: package_dir(name) for name in args.packages.split(",") if name})
    for name, src in sources.items():
        shutil.copytree(src, out / name, ignore=ignore, symlinks=True)
        print(f"{name:12s} {src}")
    print(f"corpus in {out}: ryz index build {out}")


if __name__ == "__main__":
    main()
