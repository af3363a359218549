"""`ryz registry list|history|aliases|show` and `ryz gc`: model versions and artifact clean-up (docs/registry.md)."""

from __future__ import annotations

import sys

from flows.cli_common import print_json as _print_json
from flows.cli_common import store as _store
from flows.cli_common import when as _when


def _registry():
    from engine.artifacts.registry import Registry

    return Registry(_store())


def cmd_registry_list(args) -> int:
    versions = _registry().versions(args.name)
    if args.json:
        _print_json([v.to_json() for v in versions])
        return 0
    for v in versions:
        print(f"{v.ref:<32} {v.status:<12} {v.artifact_id[:19]}  {_when(v.created)}")
    if not versions:
        print("the registry is empty", file=sys.stderr)
    return 0


def cmd_registry_show(args) -> int:
    registry = _registry()
    version = registry.get(args.ref)
    doc = version.to_json()
    doc["aliases"] = sorted(
        a for a, t in registry.aliases().items() if (t["name"], t["version"]) == (version.name, version.version)
    )
    _print_json(doc)
    return 0


def cmd_registry_history(args) -> int:
    events = _registry().history(args.name)
    if args.json:
        _print_json([{**e, "time": _when(e["time"])} for e in events])
        return 0
    for e in events:
        target = f"{e['name']}:{e['version']}" if e.get("name") else "-"
        print(f"{_when(e['time'])}  {e['action']:<18} {target:<28} {e['actor']:<24} {e['reason']}")
    return 0


def cmd_registry_aliases(args) -> int:
    aliases = _registry().aliases()
    if args.json:
        _print_json(aliases)
        return 0
    for alias, target in sorted(aliases.items()):
        print(f"{alias:<12} {target['name']}:{target['version']}")
    return 0


def cmd_gc(args) -> int:
    from engine.artifacts.gc import collect_garbage

    result = collect_garbage(_store(), keep=args.keep, dry_run=args.dry_run)
    if args.json:
        _print_json(result)
    else:
        verb = "would remove" if args.dry_run else "removed"
        for item in result["removed"]:
            print(f"{verb} {item['artifact_id']}  {item['kind']:<10} {item['size']:>12,} B  {item['why']}")
        print(
            f"{verb} {len(result['removed'])} artifacts ({result['bytes']:,} bytes); kept {result['kept']}",
            file=sys.stderr,
        )
    return 0


def add_registry_commands(sub, command) -> None:
    """Add these commands to `ryz`'s subparsers (`command(name, handler, help)` makes one with --json)."""
    registry = sub.add_parser("registry", help="model versions, aliases and their history").add_subparsers(
        dest="registry_command", required=True
    )
    for name, handler, help_ in (
        ("list", cmd_registry_list, "every version with its status and artifact"),
        ("history", cmd_registry_history, "the event log: who changed what, when and why"),
        ("aliases", cmd_registry_aliases, "production / canary / previous"),
        ("show", cmd_registry_show, "one version (JSON)"),
    ):
        p = registry.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if name == "show":
            p.add_argument(
                "ref",
                help="name:version (ryz-demo-m:1), an alias (production, canary, previous), or a name (its newest "
                "version)",
            )
        elif name in ("list", "history"):
            p.add_argument("name", nargs="?", help="only this model name")

    p = command(
        "gc",
        cmd_gc,
        "remove artifacts nothing refers to (registry versions, aliases, bundles), beyond the newest N per name",
    )
    p.add_argument("--keep", type=int, default=2, help="unreferenced model artifacts kept per model name (default 2)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
