"""Model references (DESIGN.md "Names every command agrees on") resolved to a local GGUF path.

Accepted now: an artifact id or unique prefix (>= 12 hex digits) and a GGUF file path. `name:version`
and aliases are answered by the registry once it exists.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.errors import ArtifactNotFoundError, ModelReferenceError
from engine.store import ArtifactStore

_HEX_PREFIX = re.compile(r"^(sha256:)?[0-9a-f]{12,64}$")


def resolve_model(ref: str, store: ArtifactStore) -> Path:
    """A local path holding the model's GGUF bytes (verified against its id when from the store)."""
    path = Path(ref).expanduser()
    if ref.endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise ModelReferenceError(f"GGUF file {ref!r} does not exist")
        return path
    if _HEX_PREFIX.match(ref):
        try:
            return store.local_path(store.resolve(ref))
        except ArtifactNotFoundError:
            raise ModelReferenceError(f"no artifact {ref!r} in {store.url}; list them with `ryz artifacts`") from None
    raise ModelReferenceError(
        f"cannot resolve model reference {ref!r}: pass an artifact id (sha256:... or a prefix of >= 12 hex digits) "
        "or a path to a .gguf file (name:version and aliases need the registry)")
