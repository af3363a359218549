"""Model references (DESIGN.md "Names every command agrees on") resolved to a local GGUF path.

Accepted: `name:version`, an alias (`production`, `canary`, `previous`), an artifact id or unique
prefix (>= 12 hex digits), or a GGUF file path. Registry references resolve to the version's artifact.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.artifacts.registry import Registry, is_registry_ref
from engine.artifacts.store import ArtifactStore
from engine.errors import ArtifactNotFoundError, ModelReferenceError

_HEX_PREFIX = re.compile(r"^(sha256:)?[0-9a-f]{12,64}$")


def resolve_model(ref: str, store: ArtifactStore) -> Path:
    """A local path holding the model's GGUF bytes (verified against its id when from the store)."""
    path = Path(ref).expanduser()
    if ref.endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise ModelReferenceError(f"GGUF file {ref!r} does not exist")
        return path
    return store.local_path(resolve_artifact(ref, store))


def resolve_artifact(ref: str, store: ArtifactStore) -> str:
    """The full artifact id a non-path model reference names."""
    if _HEX_PREFIX.match(ref):
        try:
            return store.resolve(ref)
        except ArtifactNotFoundError:
            raise ModelReferenceError(f"no artifact {ref!r} in {store.url}; list them with `ryz artifacts`") from None
    if is_registry_ref(ref):
        return Registry(store).get(ref).artifact_id
    raise ModelReferenceError(
        f"cannot resolve model reference {ref!r}: pass name:version, an alias (production, canary, previous), an "
        "artifact id (sha256:... or a prefix of >= 12 hex digits) or a path to a .gguf file"
    )
