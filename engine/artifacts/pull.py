"""`ryz pull`: one model, from the Hub (`REPO[@REVISION]`) or a local directory, into a runnable registry version.

Pinned: a Hub revision (branch, tag or sha; default the default branch) is first resolved to its commit sha by
model_info, and exactly that sha is downloaded (huggingface_hub's snapshot_download: the HF cache, HF_TOKEN, a
cut transfer resumed with a Range request). Offline (HF_HUB_OFFLINE=1, or the Hub unreachable or failing) the
cached snapshot of the revision is used, and the result says so. The model then passes discovery's own filters
(architecture, license, parameters, size: engine/artifacts/discovery.py `filter_reasons`), is quantized into the
store and registered with status `pulled`: runnable by reference, never given an alias, never released, and not
counted by the pipeline's novelty test, so discovery still sends the same source through the gates.

Idempotent on (repo, revision sha), or for a directory (name, content hash): a source already registered, by an
earlier pull or by the pipeline, is reported as that version and nothing is downloaded or registered again.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.artifacts.discovery import (
    DOWNLOAD_PATTERNS,
    Candidate,
    filter_reasons,
    hf_cache_snapshot,
    hub_candidate,
    read_hub_info,
    read_local_model,
)
from engine.artifacts.registry import Registry, Version
from engine.errors import HubError, PullError
from engine.fsutil import atomic_file
from engine.model.quantize import find_quantized, planned_bytes, quantize_to_store
from engine.settings import Settings

# Besides what the quantizer reads (discovery's DOWNLOAD_PATTERNS): the card and license, when small, so a pulled
# snapshot keeps its license for a later offline pull or a scan of the HF cache.
CARD_FILES = ("README.md", "LICENSE", "LICENSE.md", "LICENSE.txt")
CARD_MAX_BYTES = 1_000_000

Log = Callable[[str], None]
# Given the bytes the quantizer will write, a context yielding its progress callback (a bar, or nothing).
QuantizeBar = Callable[[int], AbstractContextManager[Callable[[int], None] | None]]


@dataclass
class PullResult:
    name: str
    version: int
    artifact_id: str
    status: str  # pulled, or the status of the version the pipeline registered from this source
    source: dict  # {"type": "hf" | "local", "repo", "revision", ("path")}
    already: bool  # this source was registered before: nothing was downloaded or registered
    offline: bool = False  # the Hub was not asked (HF_HUB_OFFLINE) or did not answer: the HF cache served it
    checkpoint: str | None = None  # the checkpoint directory quantized (None when already registered)
    message: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_json(self) -> dict:
        return {"ref": self.ref, **asdict(self)}


def parse_target(target: str) -> tuple[str, str | None, Path | None]:
    """("local", None, dir) for a directory; ("hf", revision or None, None) with the repo id for `org/name[@rev]`.
    Returns (repo_or_dir_name, revision, path)."""
    path = Path(target).expanduser()
    if path.is_dir():
        return path.resolve().name, None, path.resolve()
    if path.exists() or target.startswith((".", "/", "~")):
        raise PullError(f"{target} is not a model directory; pass a directory with config.json, or org/name[@revision]")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo, _, revision = target.partition("@")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise PullError(
            f"{target!r} is neither a directory nor a Hub repo id ({exc}); pass org/name[@revision] or a directory"
        ) from None
    if "@" in target and not revision:
        raise PullError(f"{target!r} names no revision after '@'; pass org/name@REVISION (a branch, tag or sha)")
    return repo, revision or None, None


def pull_model(
    target: str,
    settings: Settings,
    store,
    *,
    weights: str | None = None,
    head: str | None = None,
    log: Log = lambda _line: None,
    progress_bars: bool = False,
    quantize_bar: QuantizeBar | None = None,
) -> PullResult:
    """Fetch, check, quantize and register `target` (`org/name[@revision]` or a model directory).

    `log` gets a few plain progress lines; `progress_bars` shows huggingface_hub's own download bars (on stderr).
    Raises PullError with the reason when a check refuses the model or it cannot be fetched.
    """
    registry = Registry(store)
    name, revision, path = parse_target(target)
    if path is not None:
        candidate, cached, fetch = _local(path, log), None, None
    else:
        candidate, cached, fetch = _hub(name, revision, settings, log, progress_bars)
    offline = cached is not None
    source = {"type": candidate.source, "repo": candidate.repo, "revision": candidate.revision}
    if candidate.path and path is not None:
        source["path"] = candidate.path
    name = candidate.repo  # the name discovery and the pipeline give this source
    pinned = f"{name}@{(candidate.revision or '?')[:12]}"

    # The pipeline's version first: it went through the gates.
    existing = registry.find_source(name, candidate.revision) or registry.find_source(
        name, candidate.revision, pulled=True
    )
    if existing is not None:
        return _already(existing, source, offline)
    if reasons := filter_reasons(candidate, settings):
        raise PullError(
            f"refusing {pinned}: " + "; ".join(reasons) + ". These are discovery's filters; the settings named "
            "change them (`ryz config show` prints their values)"
        )
    checkpoint = Path(fetch()) if fetch is not None else Path(candidate.path or "")

    weights, head = weights or settings.weights_type, head or settings.head_type
    artifact_id = find_quantized(store, candidate.revision or "", weights, head)
    if artifact_id is None:
        log(f"quantizing {checkpoint} ({weights} weights, {head} head)")
        bar = quantize_bar or (lambda _total: nullcontext(None))
        with bar(planned_bytes(checkpoint, weights, head)) as update:
            manifest = quantize_to_store(
                checkpoint, store, settings.cache_dir / "tmp", weights, head, update, source=source
            )
        artifact_id = manifest["artifact_id"]
    else:
        log(f"{pinned} was already quantized with these types: {artifact_id}")
    reason = f"ryz pull {pinned}" + (f" from the HF cache ({cached})" if cached else "")
    version, added = registry.register_once(name, artifact_id, source, reason=reason, status="pulled")
    if not added:  # another pull or pipeline registered it meanwhile
        return _already(version, source, offline)
    return PullResult(
        version.name,
        version.version,
        artifact_id,
        version.status,
        source,
        False,
        offline,
        str(checkpoint),
        f"pulled {pinned} as {version.ref}" + (f" from the HF cache ({cached})" if cached else ""),
    )


def _already(version: Version, source: dict, offline: bool) -> PullResult:
    if version.status == "pulled":
        message = f"already pulled as {version.ref}"
    else:
        message = (
            f"already registered by the pipeline as {version.ref} ({version.status}); it is runnable as {version.ref}"
        )
    return PullResult(
        version.name, version.version, version.artifact_id, version.status, source, True, offline, None, message
    )


# --- a local directory -------------------------------------------------------------------------------------


def _local(path: Path, log: Log) -> Candidate:
    if not (path / "config.json").is_file():
        raise PullError(f"{path} has no config.json; pass a Hugging Face model directory")
    cached = hf_cache_snapshot(path)  # a snapshot in an HF cache is named like the local source names it
    log(f"hashing the files of {path}")
    candidate = read_local_model(path, *(cached or (None, None)))
    if candidate.status == "error":
        raise PullError(candidate.reason)
    return candidate


# --- the Hub -------------------------------------------------------------------------------------------------


def _hub(
    repo: str, revision: str | None, settings: Settings, log: Log, progress_bars: bool
) -> tuple[Candidate, str | None, Callable[[], str] | None]:
    """The candidate at its pinned sha; why the HF cache answered instead of the Hub (None: the Hub answered); and
    how to download it (None: it is the cached snapshot)."""
    from huggingface_hub import constants

    cache = settings.discovery_hf_cache or None
    if constants.is_offline_mode():
        why = "HF_HUB_OFFLINE is set"
    else:
        try:
            info = read_hub_info(
                repo, endpoint=settings.hf_endpoint, timeout=settings.discovery_timeout, revision=revision
            )
        except HubError as exc:
            if not exc.retryable:
                hint = " or run `huggingface-cli login` (`hf auth login`)" if "HF_TOKEN" in str(exc) else ""
                raise PullError(f"cannot pull {repo}: {exc}{hint}") from None
            why = f"the Hub did not answer ({exc})"
        else:
            candidate = hub_candidate(info)
            patterns = list(DOWNLOAD_PATTERNS) + [
                s.rfilename
                for s in info.siblings or []
                if s.rfilename in CARD_FILES and s.size is not None and s.size <= CARD_MAX_BYTES
            ]
            sizes = [s.size or 0 for s in info.siblings or [] if _matches(s.rfilename, patterns)]
            sha = candidate.revision or ""

            def download() -> str:
                log(
                    f"downloading {len(sizes)} files ({sum(sizes) / 1e6:.1f} MB) of {repo}@{sha[:12]} from "
                    f"{settings.hf_endpoint} into {cache or 'the HF cache'}"
                )
                path = _download(repo, sha, patterns, settings, cache, progress_bars)
                _remember_ref(Path(path), revision or "main", sha)
                log(f"downloaded {repo}@{sha[:12]} to {path}")
                return path

            return candidate, None, download
    snapshot = _cached_snapshot(repo, revision, cache, why)
    log(f"{why}: using the cached snapshot {snapshot}")
    candidate = read_local_model(snapshot, repo=repo, revision=snapshot.name)
    if candidate.status == "error":
        raise PullError(candidate.reason)
    candidate.source = "hf"
    return candidate, why, None


def _matches(filename: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(filename, pattern) for pattern in patterns)


def _remember_ref(snapshot: Path, revision: str, sha: str) -> None:
    """Record `revision` -> sha in the cache's refs/, as snapshot_download does for a branch or tag: the download
    asked for the sha itself (the pin), so without this an offline `pull org/name` could not find it."""
    if revision == sha:
        return
    ref = snapshot.parent.parent / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(ref) as tmp:
        tmp.write_text(sha)


def _cached_snapshot(repo: str, revision: str | None, cache: str | None, why: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                local_files_only=True,
                allow_patterns=list(DOWNLOAD_PATTERNS),
            )
        )
    except LocalEntryNotFoundError as exc:
        incomplete = "incomplete" in str(exc)
        raise PullError(
            f"{why}, and {repo}@{revision or 'main'} is "
            + ("only partly" if incomplete else "not")
            + f" in the HF cache ({cache or 'HF_HUB_CACHE'}); pull it once with the Hub reachable (unset "
            "HF_HUB_OFFLINE, check HF_ENDPOINT and the network)"
        ) from None


def _download(
    repo: str, sha: str, patterns: list[str], settings: Settings, cache: str | None, progress_bars: bool
) -> str:
    import httpx2
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    page = f"{settings.hf_endpoint}/{repo}"
    try:
        return snapshot_download(
            repo,
            revision=sha,
            allow_patterns=patterns,
            cache_dir=cache,
            endpoint=settings.hf_endpoint,
            etag_timeout=settings.discovery_timeout,
            library_name="ryzanstein",
            tqdm_class=None if progress_bars else _silent_tqdm(),
        )
    except GatedRepoError as exc:
        if exc.response is not None and exc.response.status_code == 403:
            raise PullError(
                f"{repo} is gated and the token sent (HF_TOKEN, or the one `huggingface-cli login` saved) has not "
                f"been granted access: accept its terms on {page} with that account, or use a token that has"
            ) from None
        raise PullError(
            f"{repo} is gated and no Hugging Face token was sent: accept its terms on {page}, then set HF_TOKEN "
            "to a token of that account or run `huggingface-cli login` (`hf auth login`), and pull again"
        ) from None
    except RepositoryNotFoundError:
        raise PullError(
            f"{repo} was not found at {settings.hf_endpoint}, or is private: check the repo id; a private repo "
            "needs HF_TOKEN (or `huggingface-cli login`)"
        ) from None
    except (HfHubHTTPError, LocalEntryNotFoundError, httpx2.HTTPError, OSError) as exc:
        raise PullError(
            f"downloading {repo}@{sha[:12]} failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); run the "
            "same command again: finished files stay in the HF cache and are not fetched twice"
        ) from None


def _silent_tqdm() -> type:
    """huggingface_hub's tqdm with every bar disabled (stderr is not a terminal: no bar redraws in logs)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class NoBars(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return NoBars
