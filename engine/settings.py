"""The one settings object: every knob, read once from `RYZ_*` environment variables.

Only this module reads `os.environ` (plus `HF_*`, which the Hub client reads itself).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".ryzanstein"


class Settings(BaseSettings):
    """Effective configuration. `ryz config show` prints each value and where it came from."""

    model_config = SettingsConfigDict(env_prefix="RYZ_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="root for the file store, caches and builds")
    store: str = Field("", description="artifact store URL: file:///path or s3://bucket/prefix (default: file://$RYZ_HOME/store)")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, Ceph...); unset: AWS")
    threads: int = Field(0, ge=0, description="compute threads; 0 = all physical cores")
    isa: Literal["auto", "avx512", "avx2", "neon", "scalar"] = Field("auto", description="force a kernel path")
    cxx: str | None = Field(None, description="C++ compiler for the kernel build (name or path); unset: c++, g++ or clang++ on PATH")
    weights_type: Literal["tq2_0", "tq1_0"] = Field("tq2_0", description="default ternary GGUF type")
    head_type: Literal["q8_0", "q6_k", "f16"] = Field("q8_0", description="default embedding/head GGUF type")
    qdrant_url: str | None = Field(None, description="Qdrant server; unset: embedded Qdrant Edge")

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def store_url(self) -> str:
        return self.store or f"file://{self.home / 'store'}"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


def describe_settings(settings: Settings) -> list[dict[str, Any]]:
    """Each field's effective value and its source (`env RYZ_X` or `default`)."""
    rows = []
    for name, field in Settings.model_fields.items():
        env_name = f"RYZ_{name.upper()}"
        value = getattr(settings, name)
        rows.append({
            "name": name,
            "env": env_name,
            "value": str(value) if isinstance(value, Path) else value,
            "source": f"env {env_name}" if env_name in os.environ else "default",
            "description": field.description or "",
        })
    rows.append({
        "name": "store_url", "env": "RYZ_STORE", "value": settings.store_url,
        "source": "env RYZ_STORE" if settings.store else "derived from RYZ_HOME",
        "description": "effective artifact store",
    })
    for hf_name in ("HF_ENDPOINT", "HF_HOME", "HF_HUB_OFFLINE"):
        rows.append({
            "name": hf_name.lower(), "env": hf_name, "value": os.environ.get(hf_name),
            "source": f"env {hf_name}" if hf_name in os.environ else "unset (huggingface_hub default)",
            "description": "read by huggingface_hub",
        })
    return rows


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reload_settings() -> Settings:
    """Re-read the environment (tests change it)."""
    get_settings.cache_clear()
    return get_settings()
