"""`ryz export REF --to ik_llama|llama.cpp -o FILE.gguf`: the handler flows/cli.py wires (no Prefect import)."""

from __future__ import annotations

import sys
from pathlib import Path

from flows.cli_common import MODEL_REF_HELP, print_json, store


def add_export_command(sub, command) -> None:
    p = command(
        "export",
        cmd_export,
        "write a model as the GGUF another engine computes correctly (llama.cpp: bitnet; ik_llama.cpp: bitnet-25 "
        "or bitnet with IQ2_BN weights), or refuse with the reason when no graph of that engine computes it",
    )
    p.add_argument("ref", metavar="REF", help=MODEL_REF_HELP)
    p.add_argument(
        "--to",
        required=True,
        choices=["ik_llama", "llama.cpp"],
        help="the engine: llama.cpp (SiLU models with sub-norms and a tied head, copied as is) or ik_llama "
        "(relu² or SiLU models with sub-norms; ternary weights transcoded to its IQ2_BN type)",
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="the .gguf file to write (replaced atomically)")


def cmd_export(args) -> int:
    from tqdm import tqdm

    from engine.artifacts.refs import resolve_model
    from engine.model.export import check_output_path, export_model, planned_bytes

    source = resolve_model(args.ref, store())
    check_output_path(source, args.output)
    total = planned_bytes(source, args.to)  # refuses here, before anything is written, if no graph fits
    quiet = args.json or not sys.stderr.isatty()
    with tqdm(total=total, desc=f"export {args.to}", unit="B", unit_scale=True, file=sys.stderr, disable=quiet) as bar:
        result = export_model(source, args.to, args.output, progress=bar.update)
    if args.json:
        print_json(result)
        return 0
    print(result["path"])
    print(
        f"  architecture  {result['architecture']} for {result['target']} (from {result['source_architecture']}); "
        f"ternary weights {result['ternary_type']}"
        + (
            f", {result['transcoded_tensors']} tensors transcoded" if result["transcoded_tensors"] else ", copied as is"
        ),
        file=sys.stderr,
    )
    print(f"  size          {result['size']:,} bytes, sha256 {result['sha256']}", file=sys.stderr)
    return 0
