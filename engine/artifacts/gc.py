"""Store lifecycle: remove artifacts nothing refers to (`ryz gc`).

Kept, always: every artifact a registry version points at (its model artifact, evaluation record and
bundle), which includes everything an alias names, and everything those artifacts' manifests list in
`refers_to` (a bundle names its GGUF). Of the rest, the newest `keep` per (kind, model name) stay, so
a quantization you have not registered yet survives one more run; older ones go. Removal deletes the
manifest before the blob, so a listed artifact always has its bytes.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import PurePosixPath

from engine.artifacts.registry import Registry


def _model_name(manifest: dict) -> str:
    source = manifest.get("source") or {}
    for key in ("repo", "path", "name"):
        if source.get(key):
            return PurePosixPath(str(source[key])).name if key == "path" else str(source[key])
    return manifest.get("name") or "-"


def referenced_artifacts(store) -> dict[str, str]:
    """artifact id -> why it is kept (registry roots and everything their manifests refer to)."""
    registry = Registry(store)
    aliases = {(t["name"], t["version"]): alias for alias, t in registry.aliases().items()}
    keep: dict[str, str] = {}
    pending = []
    for v in registry.versions():
        why = f"{v.ref}" + (f" ({aliases[(v.name, v.version)]})" if (v.name, v.version) in aliases else "")
        for artifact in (v.artifact_id, v.evaluation, (v.extra or {}).get("bundle")):
            if artifact and artifact not in keep:
                keep[artifact] = why
                pending.append(artifact)
    while pending:
        artifact = pending.pop()
        try:
            manifest = store.get_manifest(artifact)
        except Exception:  # noqa: BLE001 - a dangling reference keeps nothing else
            continue
        for child in manifest.get("refers_to", []):
            if child not in keep:
                keep[child] = f"referred to by {artifact[:19]}"
                pending.append(child)
    return keep


def collect_garbage(store, keep: int = 2, dry_run: bool = False) -> dict:
    if keep < 0:
        raise ValueError("--keep must be >= 0")
    protected = referenced_artifacts(store)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for manifest in store.list_artifacts():  # newest first
        if manifest["artifact_id"] not in protected:
            groups[(manifest.get("kind", "-"), _model_name(manifest))].append(manifest)
    removed, kept = [], len(protected)
    for (kind, name), manifests in sorted(groups.items()):
        kept += min(keep, len(manifests))
        for manifest in manifests[keep:]:
            removed.append(
                {
                    "artifact_id": manifest["artifact_id"],
                    "kind": kind,
                    "name": name,
                    "size": manifest.get("size", 0),
                    "why": f"unreferenced, older than the newest {keep} of {name}",
                }
            )
            if not dry_run:
                store.delete(manifest["artifact_id"])
    return {"removed": removed, "bytes": sum(r["size"] for r in removed), "kept": kept, "dry_run": dry_run}
