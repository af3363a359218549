"""Every Ryzanstein error, grouped by area. Each is also a stdlib type, and its message says what
is wrong and how to fix it."""

from __future__ import annotations


class RyzError(Exception):
    """Base of all Ryzanstein errors."""


# --- artifact store -------------------------------------------------------------------------------

class StoreError(RyzError, OSError):
    """The artifact store could not be read or written."""


class ArtifactNotFoundError(StoreError, FileNotFoundError):
    """No artifact with that id (or prefix) is in the store."""


class AmbiguousReferenceError(RyzError, ValueError):
    """An artifact id prefix matches more than one artifact."""


class IntegrityError(StoreError):
    """Stored bytes do not hash to their artifact id: `sha256 mismatch for sha256:ab12...`."""


class ConflictError(StoreError):
    """A compare-and-swap write lost a race: somebody else changed the document first."""


class SchemaVersionError(RyzError, ValueError):
    """A manifest or record carries a schema version this build does not understand."""


# --- checkpoints and quantization -----------------------------------------------------------------

class CheckpointError(RyzError, ValueError):
    """A Hugging Face model directory is missing files, corrupt, or inconsistent."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture is not one Ryzanstein can quantize."""


class GGUFFormatError(RyzError, ValueError):
    """A GGUF file is not a Ryzanstein model artifact or is missing required tensors/keys."""


# --- references -------------------------------------------------------------------------------------

class ModelReferenceError(RyzError, LookupError):
    """A model reference (`name:version`, alias, artifact id or GGUF path) resolves to nothing."""


# --- kernel builds ----------------------------------------------------------------------------------

class BuildError(RyzError, RuntimeError):
    """The native kernel build failed: `cmake --build ... failed (exit 2); last lines: ...; full log: <path>`."""


class ToolchainNotFoundError(BuildError):
    """No C++ compiler or CMake >= 3.25 to build the kernels:
    `no C++ compiler found (looked for c++, g++, clang++); install one: apt-get install g++ cmake`."""
