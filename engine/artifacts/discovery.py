"""Discovery: which models a source offers and which of them are new candidates (DESIGN.md "Discovery").

Two sources, one record (`Candidate`): `hf` asks the Hugging Face Hub (the listing, then each model's info:
config, card license, safetensors parameter counts, file sizes, commit sha); `local` reads model directories
(a folder of them in zoo.json order) and the HF cache (`models--org--name/snapshots/<sha>/`). `judge_candidates`
then applies the settings' filters and the registry's novelty test, and says why each model is kept or skipped.

Hub requests carry a timeout and are never retried here: the caller's retry policy (tasks/discovery.py,
settings.discovery_retries) is the only one. That is why the listing is the same GET `HfApi.list_models`
sends, made through huggingface_hub's own session, error mapping and `ModelInfo` parsing: `list_models` takes
no timeout (a hung Hub would hang the run) and retries 429/5xx on a fixed 1-8 s schedule of its own.
Every failure is a `HubError` whose `retryable` says whether asking again can help.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from engine.artifacts.registry import Registry
from engine.errors import CheckpointError, HubError
from engine.model.checkpoint import read_safetensors_header
from engine.model.quantize import directory_revision
from engine.settings import Settings

T = TypeVar("T")
ZOO_INDEX = "zoo.json"
# What a download of a Hub model fetches (and so what "size on disk" counts): weights, configs, tokenizer.
DOWNLOAD_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "tokenizer.model")
_SORT_KEYS = {"last_modified": "lastModified", "created_at": "createdAt", "trending_score": "trendingScore"}


@dataclass
class Candidate:
    """One model a source listed, and what discovery decided about it (JSON: `to_json`)."""

    source: str  # "hf" or "local"
    repo: str  # Hub id (also for HF-cache snapshots), else the directory name
    revision: str | None  # Hub commit sha, cache snapshot sha, or directory_revision
    path: str | None = None  # local directory (local source only)
    architecture: str | None = None
    quant_method: str | None = None  # config.json quantization_config.quant_method ("bitnet" for ternary-trained)
    license: str | None = None
    parameters: int | None = None  # ternary weights counted unpacked (4 per U8 byte when quant_method is bitnet)
    size_bytes: int | None = None
    status: str = "seen"  # kept | skipped | error
    reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> Candidate:
        return cls(**doc)


# --- the Hub ----------------------------------------------------------------------------------------


def list_hub_models(
    *,
    endpoint: str,
    search: str | None = None,
    filter: Iterable[str] = (),
    sort: str | None = None,
    limit: int = 50,
    timeout: float = 30.0,
) -> list[str]:
    """Model ids the Hub lists for this query, in its order (one page of at most `limit`)."""
    from huggingface_hub import ModelInfo, get_session
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = f"{endpoint}/api/models"
    params: list[tuple[str, str | int | float | bool | None]] = [("limit", limit)]  # httpx's query value types
    params += [("search", search)] if search else []
    params += [("filter", tag) for tag in filter]
    params += [("sort", _SORT_KEYS.get(sort, sort))] if sort else []

    def call() -> list[str]:
        response = get_session().get(
            url, params=params, headers=build_hf_headers(library_name="ryzanstein"), timeout=timeout
        )
        hf_raise_for_status(response)
        items = response.json()
        if not isinstance(items, list):
            raise ValueError(f"expected a JSON array of models, got {type(items).__name__}")
        return [ModelInfo(**item).id for item in items][:limit]

    return _ask_hub("listing models", url, timeout, call)


def read_hub_model(repo: str, *, endpoint: str, timeout: float = 30.0, revision: str | None = None) -> Candidate:
    """One Hub model's config, license, parameter count, download size and commit sha (at `revision`, a branch,
    tag or sha; default the default branch)."""
    return hub_candidate(read_hub_info(repo, endpoint=endpoint, timeout=timeout, revision=revision))


def read_hub_info(repo: str, *, endpoint: str, timeout: float = 30.0, revision: str | None = None):
    """huggingface_hub's ModelInfo (with file sizes) of one repo at `revision`; every failure a HubError."""
    from urllib.parse import quote

    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, library_name="ryzanstein")
    url = f"{endpoint}/api/models/{repo}" + (f"/revision/{quote(revision, safe='')}" if revision else "")
    return _ask_hub(
        f"reading {repo}" + (f"@{revision}" if revision else ""),
        url,
        timeout,
        lambda: api.model_info(repo, revision=revision, files_metadata=True, timeout=timeout),
    )


def hub_candidate(info) -> Candidate:
    """The candidate a ModelInfo describes."""
    config = info.config or {}
    quant_method = _quant_method(config)
    parameters = None
    if info.safetensors is not None:
        parameters = count_parameters(info.safetensors.parameters, quant_method)
    sizes = [s.size for s in info.siblings or [] if s.size is not None and _downloaded(s.rfilename)]
    return Candidate(
        "hf",
        info.id,
        info.sha,
        None,
        _architecture(config),
        quant_method,
        _hub_license(info),
        parameters,
        sum(sizes) if sizes else None,
    )


def _ask_hub(what: str, url: str, timeout: float, call: Callable[[], T]) -> T:
    """Run one Hub request, turning every way it can fail into a HubError that says whether to retry."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    try:
        return call()
    except HFValidationError as exc:
        raise HubError(f"{what}: {exc}", retryable=False) from None
    except OfflineModeIsEnabled:
        raise HubError(
            f"{what}: HF_HUB_OFFLINE is set, so the Hub is not asked; unset it or use the local source", retryable=False
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        retryable = status is None or status in (408, 429) or status >= 500
        hint = {
            401: "private or gated: set HF_TOKEN",
            403: "gated: accept its terms on the Hub and set HF_TOKEN",
            404: "check the repo id (private repos need HF_TOKEN)",
            429: "rate limited by the Hub",
        }.get(status, "the Hub is failing" if retryable else "the Hub refused the request")
        raise HubError(f"{what}: HTTP {status} from {url}: {hint}", retryable=retryable) from None
    except httpx2.TimeoutException:
        raise HubError(
            f"{what}: {url} did not answer within {timeout:g} s (RYZ_DISCOVERY_TIMEOUT)", retryable=True
        ) from None
    except httpx2.TransportError as exc:
        raise HubError(
            f"{what}: cannot reach {url} ({type(exc).__name__}: {exc}); check HF_ENDPOINT and the network",
            retryable=True,
        ) from None
    except (ValueError, KeyError, TypeError) as exc:  # invalid JSON, or JSON without the fields the Hub always sends
        raise HubError(f"{what}: malformed response from {url} ({type(exc).__name__}: {exc})", retryable=True) from None


def _hub_license(info) -> str | None:
    card = info.card_data
    license_ = getattr(card, "license", None) if card is not None else None
    if license_ == "other" and getattr(card, "license_name", None):
        return card.license_name
    if license_ is None:
        license_ = next((tag.split(":", 1)[1] for tag in info.tags or [] if tag.startswith("license:")), None)
    return _one_license(license_)


def _one_license(value: Any) -> str | None:
    """A license field: a name, or a list of names of which the first counts (an empty list declares none)."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _downloaded(filename: str) -> bool:
    return (
        any(fnmatch.fnmatch(filename.rsplit("/", 1)[-1], pattern) for pattern in DOWNLOAD_PATTERNS)
        and "/" not in filename
    )


# --- local directories and the HF cache ---------------------------------------------------------------


def scan_local_models(
    paths: Iterable[str | Path], hf_cache: str | Path | None = None, warn: Callable[[str], None] | None = None
) -> list[Candidate]:
    """Every model directory under `paths` (each a model directory, or a folder of them: zoo.json order if it has
    one, else sorted names), then every snapshot in the HF cache."""
    found = [read_local_model(d) for root in paths for d in _model_dirs(Path(root).expanduser(), warn)]
    if hf_cache and Path(hf_cache).expanduser().is_dir():
        for repo_dir in sorted(Path(hf_cache).expanduser().glob("models--*")):
            repo = _cache_repo(repo_dir.name)
            snapshots = repo_dir / "snapshots"
            for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
                if (snapshot / "config.json").is_file():
                    found.append(read_local_model(snapshot, repo=repo, revision=snapshot.name))
    return found


def _cache_repo(folder: str) -> str:
    return folder[len("models--") :].replace("--", "/")  # the Hub forbids "--" in ids


def hf_cache_snapshot(path: str | Path) -> tuple[str, str] | None:
    """(repo, commit sha) when `path` is a snapshot in an HF cache (`models--org--name/snapshots/<sha>`), as the
    local source names it; None for any other directory."""
    path = Path(path).resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return _cache_repo(path.parent.parent.name), path.name
    return None


def _model_dirs(root: Path, warn: Callable[[str], None] | None) -> list[Path]:
    if (root / "config.json").is_file():
        return [root]
    if not root.is_dir():
        if warn:
            warn(f"{root}: not a directory; nothing to discover there")
        return []
    index = root / ZOO_INDEX
    if index.is_file():
        try:
            return [root / entry["path"] for entry in json.loads(index.read_text(encoding="utf-8"))["models"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if warn:
                warn(f"{index}: unreadable ({type(exc).__name__}: {exc}); using the sorted directory names instead")
    return sorted(d for d in root.iterdir() if (d / "config.json").is_file())


def read_local_model(path: str | Path, repo: str | None = None, revision: str | None = None) -> Candidate:
    """Describe a model directory from its config.json, README front matter and safetensors headers (no weights read).
    `revision` defaults to directory_revision (a hash of every file: slow on big models, and what DESIGN.md asks)."""
    path = Path(path)
    candidate = Candidate("local", repo or path.name, revision, str(path))
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        candidate.architecture, candidate.quant_method = _architecture(config), _quant_method(config)
        candidate.license = _card_license(path / "README.md")
        candidate.parameters = _local_parameters(path, candidate.quant_method)
        candidate.size_bytes = sum(
            f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")
        )
        candidate.revision = candidate.revision or directory_revision(path)
    except (OSError, json.JSONDecodeError, CheckpointError) as exc:
        candidate.status, candidate.reason = "error", f"cannot read {path}: {exc}"
    return candidate


def _local_parameters(path: Path, quant_method: str | None) -> int | None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        return None
    by_dtype: dict[str, int] = {}
    for name in files:
        for ref in read_safetensors_header(path / name).values():
            count = 1
            for dim in ref.shape:
                count *= dim
            by_dtype[ref.dtype] = by_dtype.get(ref.dtype, 0) + count
    return count_parameters(by_dtype, quant_method)


def _card_license(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(readme) or {}
    license_ = meta.get("license_name") if meta.get("license") == "other" else meta.get("license")
    return _one_license(license_)


# --- shared readers -------------------------------------------------------------------------------------


def count_parameters(by_dtype: dict[str, int], quant_method: str | None) -> int:
    """Parameters from safetensors element counts per dtype. Packed ternary checkpoints (quant_method bitnet, e.g.
    bitnet-b1.58-2B-4T) store four weights per U8 element, so the Hub's total (0.85 B there) undercounts 4x."""
    return sum(n * (4 if dtype == "U8" and quant_method == "bitnet" else 1) for dtype, n in by_dtype.items())


def _architecture(config: dict) -> str | None:
    names = config.get("architectures") or []
    return names[0] if names else None


def _quant_method(config: dict) -> str | None:
    return (config.get("quantization_config") or {}).get("quant_method")


# --- judging ----------------------------------------------------------------------------------------------


def judge_candidates(seen: Iterable[Candidate], settings: Settings, registry: Registry) -> list[Candidate]:
    """Each model seen, marked kept (passes every filter and (repo, revision) is not registered) or skipped with
    every reason; errors pass through. Order is kept, and a repeat of an earlier (repo, revision) is skipped."""
    judged: list[Candidate] = []
    earlier: set[tuple[str, str | None]] = set()
    for candidate in seen:
        if candidate.status == "error":
            judged.append(candidate)
            continue
        reasons = filter_reasons(candidate, settings)
        if not reasons and (candidate.repo, candidate.revision) in earlier:
            reasons = ["listed earlier in this run"]
        elif not reasons and (version := registry.find_source(candidate.repo, candidate.revision)) is not None:
            reasons = [f"already registered as {version.ref} ({version.status})"]
        earlier.add((candidate.repo, candidate.revision))
        candidate.status = "skipped" if reasons else "kept"
        candidate.reason = (
            "; ".join(reasons)
            if reasons
            else (
                f"new: {candidate.architecture}, {candidate.license or 'no license declared'}, "
                f"{_count(candidate.parameters)} parameters, {_size(candidate.size_bytes)}"
            )
        )
        judged.append(candidate)
    return judged


def filter_reasons(c: Candidate, settings: Settings) -> list[str]:
    """Why the settings' filters reject this model (empty: it passes)."""
    reasons = []
    if not c.revision:
        reasons.append("no revision sha (the Hub sent none)")
    if c.architecture is None:
        reasons.append("config.json names no architecture")
    elif c.architecture not in settings.discovery_architectures:
        reasons.append(f"architecture {c.architecture} not in allowlist (RYZ_DISCOVERY_ARCHITECTURES)")
    elif c.architecture in settings.discovery_bitnet_only and c.quant_method != "bitnet":
        reasons.append(
            f"{c.architecture} without a bitnet quantization_config is full precision; ternarizing it would destroy it"
        )
    allowed = {name.lower() for name in settings.discovery_licenses}
    if c.license is None and c.source == "hf":
        reasons.append("no license in the model card")
    elif c.license is not None and c.license.lower() not in allowed:
        reasons.append(f"license {c.license} not allowed (RYZ_DISCOVERY_LICENSES)")
    if c.parameters is None:
        reasons.append("no safetensors weights (parameter count unknown)")
    elif c.parameters < settings.discovery_min_params:
        reasons.append(f"{_count(c.parameters)} parameters < minimum {_count(settings.discovery_min_params)}")
    elif c.parameters > settings.discovery_max_params:
        reasons.append(f"{_count(c.parameters)} parameters > maximum {_count(settings.discovery_max_params)}")
    if c.size_bytes is not None and c.size_bytes > settings.discovery_max_size_gb * 1e9:
        reasons.append(f"{_size(c.size_bytes)} on disk > maximum {settings.discovery_max_size_gb:g} GB")
    return reasons


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _size(n: int | None) -> str:
    return "size unknown" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
