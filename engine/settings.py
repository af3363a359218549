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


def _default_corpus() -> Path:
    # This project, so a fresh install has something real to index: its checkout (docs, code, kernels) when this
    # file is in one, else the installed `engine` package (its parent, site-packages, is every package's).
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else root / "engine"


class Settings(BaseSettings):
    """Effective configuration. `ryz config show` prints each value and where it came from."""

    model_config = SettingsConfigDict(env_prefix="RYZ_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="root for the file store, caches and builds")
    store: str = Field(
        "", description="artifact store URL: file:///path or s3://bucket/prefix (default: file://$RYZ_HOME/store)"
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, Ceph...); unset: AWS")
    threads: int = Field(0, ge=0, description="compute threads; 0 = all physical cores")
    isa: Literal["auto", "amx", "avx512", "avx2", "neon", "scalar"] = Field("auto", description="force a kernel path")
    cxx: str | None = Field(
        None, description="C++ compiler for the kernel build (name or path); unset: c++, g++ or clang++ on PATH"
    )
    weights_type: Literal["tq2_0", "tq1_0"] = Field("tq2_0", description="default ternary GGUF type")
    head_type: Literal["q8_0", "q6_k", "f16"] = Field("q8_0", description="default embedding/head GGUF type")
    qdrant_url: str | None = Field(None, description="Qdrant server; unset: embedded Qdrant Edge")
    # Serving (`ryz serve`)
    host: str = Field("127.0.0.1", description="address `ryz serve` binds; 0.0.0.0 exposes it to the network")
    port: int = Field(8000, ge=1, le=65535, description="port `ryz serve` listens on")
    # secrets: kept out of repr() and redacted by describe_settings (`ryz config show`)
    admin_token: str | None = Field(
        None, repr=False, description="bearer token for /admin routes; unset: admin routes are off"
    )
    api_keys: str | None = Field(
        None,
        repr=False,
        description="comma-separated bearer keys for /v1 routes; unset or empty: no key needed (a list of only "
        "commas is refused at start)",
    )
    served_model_name: str = Field(
        "ryzanstein", description="model name clients use; routed between production and canary"
    )
    canary_by_name: bool = Field(
        False,
        description="let clients pick the canary by name (`canary` or its model id); off: only the router sends it "
        "traffic, so a release's analysis sees the share it set",
    )
    max_seqs: int = Field(8, ge=1, le=256, description="sequences decoded together (continuous batching slots)")
    max_context: int = Field(4096, ge=16, description="positions per sequence (prompt + generated)")
    max_queue: int = Field(64, ge=0, description="requests waiting for a slot before new ones get 429")
    max_tokens_limit: int = Field(4096, ge=1, description="upper bound a request's max_tokens may ask for")
    prefill_chunk: int = Field(
        128, ge=1, description="prompt tokens per engine step, so long prompts do not stall decoding"
    )
    kv_budget_mb: int = Field(8192, ge=1, description="KV cache memory over all sequences of one model; caps max_seqs")
    prefix_cache_slots: int = Field(
        2, ge=0, description="idle sequences whose KV is kept to reuse shared prompt prefixes"
    )
    # Speculative decoding (engine/serving/speculative.py, docs/serving.md); requests override it with `speculative`
    speculative: Literal["off", "ngram", "draft"] = Field(
        "off",
        description="default speculation of every request: off; ngram (prompt lookup: drafts copied from the "
        "prompt and output); draft (a smaller model, RYZ_SPEC_DRAFT_MODEL)",
    )
    spec_tokens: int = Field(4, ge=1, le=16, description="speculative decoding: tokens drafted per step (k)")
    spec_draft_model: str | None = Field(
        None,
        description="speculative decoding: a smaller model sharing the served model's tokenizer (artifact id or "
        "prefix, name:version, or a .gguf path), loaded beside every variant; enables method draft",
    )
    spec_ngram_min: int = Field(1, ge=1, le=16, description="prompt lookup: shortest n-gram matched")
    spec_ngram_max: int = Field(3, ge=1, le=16, description="prompt lookup: longest n-gram matched (tried first)")
    # adaptive draft length (engine/serving/speculative.py DraftLength; the defaults' reasons are in SpecAdapt)
    spec_adapt: bool = Field(
        True, description="speculative decoding: adapt each request's k to its acceptance (off: always k drafts)"
    )
    spec_adapt_warmup: int = Field(4, ge=0, description="adaptive k: verification steps at full k before lowering it")
    spec_adapt_window: int = Field(16, ge=1, description="adaptive k: acceptance over the last this many drafts")
    spec_adapt_low: float = Field(0.3, ge=0, le=1, description="adaptive k: acceptance below it halves k (1 -> paused)")
    spec_adapt_high: float = Field(0.6, ge=0, le=1, description="adaptive k: acceptance at or above it doubles k")
    spec_adapt_probe_every: int = Field(
        16, ge=1, description="adaptive k: a paused request drafts 1 token after this many plain steps (kept: resumed)"
    )
    profile_steps: bool = Field(
        False,
        description="time each engine step by part (the native forward's parts and the Python around it), per "
        "batch size; in GET /admin/state as `step_profile` (what `ryz bench-serve` records)",
    )
    max_request_bytes: int = Field(
        4 << 20, ge=1024, description="largest request body accepted, counted on the bytes read (chunked too): 413"
    )
    max_header_bytes: int = Field(
        32 << 10, ge=1024, description="largest total of a request's header names and values: 431 beyond"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="seconds a client may take to send its whole request body after the headers: 408"
    )
    max_json_depth: int = Field(64, ge=4, le=500, description="deepest nesting of a request's JSON body: 400")
    max_prompts: int = Field(64, ge=1, description="prompts one /v1/completions request may batch: 400 beyond")
    max_stops: int = Field(4, ge=0, description="stop strings per request (OpenAI's limit): 400 beyond")
    max_stop_chars: int = Field(1000, ge=1, description="longest stop string, in characters: 400 beyond")
    parse_special: bool = Field(
        False,
        description="parse special-token text (e.g. <|eot_id|>) in client text as special tokens: completions "
        "prompts and chat message contents; off: it is plain text (a chat template's own markers stay special)",
    )
    fault_canary_error_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="testing: fraction of canary requests answered with an injected 500 (release rollback drills)",
    )
    fault_canary_latency_ms: float = Field(
        0.0, ge=0, description="testing: extra delay before each canary request starts"
    )
    # Discovery (flows/discovery.py, docs/discovery.md): where candidates come from and which are kept.
    hf_endpoint: str = Field(
        default_factory=lambda: os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
        description="Hugging Face Hub base URL discovery asks (default $HF_ENDPOINT, else huggingface.co)",
    )
    discovery_hf_search: str = Field("bitnet", description="`hf` source: only models whose id contains this")
    discovery_hf_filter: list[str] = Field(
        default_factory=list, description='`hf` source: Hub tags every model must have, e.g. ["safetensors"]'
    )
    discovery_hf_sort: Literal["downloads", "likes", "last_modified", "created_at", "trending_score"] = Field(
        "downloads", description="`hf` source: Hub order of the listing (candidates keep it)"
    )
    discovery_hf_limit: int = Field(50, ge=1, le=1000, description="`hf` source: models listed per run")
    discovery_local_paths: list[str] = Field(
        default_factory=lambda: [str(Path(__file__).resolve().parents[1] / "examples" / "zoo")],
        description="`local` source: model directories, or folders of them (zoo.json order if present)",
    )
    discovery_hf_cache: str = Field(
        default_factory=lambda: (
            os.environ.get("HF_HUB_CACHE")
            or str(
                Path(
                    os.environ.get("HF_HOME")
                    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
                )
                / "hub"
            )
        ),
        description="`local` source: HF cache also scanned (models--org--name/snapshots/<sha>); empty: not scanned",
    )
    discovery_architectures: list[str] = Field(
        ["BitNetForCausalLM", "BitnetForCausalLM", "LlamaForCausalLM"],
        description="architectures (config.json `architectures[0]`) kept",
    )
    discovery_bitnet_only: list[str] = Field(
        ["LlamaForCausalLM"], description="architectures kept only with a bitnet quantization_config (ternary-trained)"
    )
    discovery_licenses: list[str] = Field(
        [
            "mit",
            "apache-2.0",
            "bsd-2-clause",
            "bsd-3-clause",
            "cc-by-4.0",
            "llama3",
            "llama3.1",
            "llama3.2",
            "llama3.3",
            "falcon-llm-license",
        ],
        description="licenses kept (Hub ids; `other` is judged by its license_name)",
    )
    discovery_min_params: int = Field(0, ge=0, description="fewest parameters kept (ternary weights counted unpacked)")
    discovery_max_params: int = Field(10_000_000_000, ge=1, description="most parameters kept")
    discovery_max_size_gb: float = Field(16.0, gt=0, description="largest download / directory kept, GB (1e9 bytes)")
    discovery_timeout: float = Field(
        30.0, gt=0, description="seconds one Hub request may take before it counts as failed"
    )
    discovery_retries: int = Field(
        3, ge=0, description="retries of a failed Hub request (429, 5xx, timeout, malformed JSON)"
    )
    discovery_retry_delay: float = Field(2.0, ge=0, description="seconds before the first retry; doubles each retry")
    # Gates (evaluations/gates.py): when a candidate may be released, or a CI change may merge.
    gate_accuracy_margin: float = Field(
        0.02,
        ge=0,
        description="per task, how much worse than production the headline "
        "metric may be (absolute; relative for perplexities) before a significant shortfall fails",
    )
    gate_speed_margin: float = Field(
        0.10, ge=0, lt=1, description="how much lower than production decode tok/s may be (fraction)"
    )
    gate_speed_min_delta_ms: float = Field(
        1.0,
        ge=0,
        description="noise floor for records without repeated runs: a speed gate fails only if the candidate is also "
        "this many ms per token slower",
    )
    gate_floors: dict[str, float] = Field(
        {"demo_mc": 0.35, "demo_gen": 0.05},
        description="first model ever (no production): minimum headline metric per task",
    )
    gate_min_decode_tok_s: float = Field(0.0, ge=0, description="first model ever: minimum decode tok/s (0: no floor)")
    release_policy: Literal["improve", "not-worse"] = Field(
        "improve",
        description="improve: a candidate that passes the gates replaces production only if it is also better beyond "
        "noise on a primary metric (a headline accuracy, or decode speed on the same CPU), else it is held; "
        "not-worse: passing the gates is enough",
    )
    gate_improve_z: float = Field(
        1.96,
        gt=0,
        description="policy improve: a headline accuracy is better only if it beats production by more than this "
        "many combined stderrs",
    )
    gate_improve_speed_margin: float = Field(
        0.10,
        ge=0,
        description="policy improve: decode tok/s is better only if at least this fraction above production "
        "(same CPU fingerprint, and faster by more than the ms-per-token noise floor)",
    )
    # Retrieval index (engine/retrieval/embedder.py, engine/retrieval/corpus.py, engine/retrieval/index.py,
    # flows/index.py, docs/retrieval.md)
    index_dir: Path | None = Field(
        None, description="working directory of the built index (default $RYZ_HOME/indexes/default)"
    )
    index_collection: str = Field("ryz-index", description="collection name on a Qdrant server (RYZ_QDRANT_URL set)")
    index_precision: Literal["int8", "fp32"] = Field(
        "int8", description="embedder ONNX weights: int8 (per-channel, dynamic activations) or fp32"
    )
    index_dims: Literal[384, 256, 128] = Field(
        384,
        description="embedding dims kept (Matryoshka-style truncation of MiniLM's "
        "384, renormalised; MiniLM is not MRL-trained, so truncation costs recall)",
    )
    index_batch_size: int = Field(32, ge=1, le=1024, description="texts embedded per onnxruntime call")
    index_quantization: Literal["none", "int8", "binary1", "binary1.5", "binary2"] = Field(
        "binary1", description="vector codes held in RAM: binary 1/1.5/2 bits, scalar int8, or none (float32)"
    )
    index_oversampling: float = Field(
        16.0, ge=1.0, description="candidates fetched with the codes per result, then rescored"
    )
    index_rescore: bool = Field(True, description="rescore candidates with the original float vectors (kept on disk)")
    index_hnsw: bool = Field(True, description="HNSW graph over the codes; false: a plain full scan of the codes")
    index_hnsw_m: int = Field(8, ge=4, le=128, description="HNSW links per node (its links are held in RAM too)")
    index_hnsw_ef: int = Field(
        512,
        ge=10,
        description="HNSW search beam width (128 gave recall@10 0.92 at 112k chunks, 512 0.97: docs/benchmarks.md)",
    )
    index_chunk_chars: int = Field(
        1000, ge=100, description="largest chunk, characters (cut on headings, definitions, blank lines)"
    )
    index_chunk_overlap: int = Field(
        150, ge=0, description="characters of whole lines repeated at the start of the next chunk"
    )
    index_max_file_bytes: int = Field(1 << 20, ge=1, description="files larger than this are skipped (counted)")
    index_eval_queries: int = Field(
        200, ge=10, description="held-out queries `ryz index eval` measures recall@10 and latency on"
    )
    index_corpus: Path = Field(
        default_factory=_default_corpus,
        description="directory the `index` deployment indexes when a run names none (default: this project's "
        "checkout, or the installed engine package)",
    )
    # Release (flows/release.py, docs/release.md): canary steps and their analysis.
    release_steps: list[int] = Field([5, 25, 50, 100], description="canary traffic weights, in order (percent)")
    release_servers: list[str] = Field(
        default_factory=list,
        description="base URLs of every serving replica (the fleet releases steer); unset: no fleet, and "
        "`ryz pipeline run` releases against a server of its own on 127.0.0.1",
    )
    release_bake_s: float = Field(
        0.0,
        ge=0,
        description="watch production this long after each promotion and roll back on a regression (0: no watch)",
    )
    release_bake_min_requests: int = Field(
        50, ge=1, description="production requests the watch needs before its bake period may end"
    )
    release_watch_error_margin: float = Field(
        0.01, ge=0, description="watch: roll back when production's error rate exceeds the previous one's by this"
    )
    release_watch_latency_ratio: float = Field(
        1.5,
        gt=1,
        description="watch: roll back when production's p95 TTFT or time per token exceeds this x the previous one's",
    )
    release_min_requests: int = Field(20, ge=1, description="canary requests a step needs before it is judged")
    release_lease_s: float = Field(
        60.0,
        gt=0,
        description="a running release renews its lease this often at least; a lease older than this is stale: "
        "its flow died, and `ryz release abort` / `resume` take over",
    )
    release_step_timeout: float = Field(
        600.0, gt=0, description="seconds a step waits for enough canary traffic, then pauses"
    )
    release_error_margin: float = Field(
        0.02, ge=0, description="canary error rate may exceed production's by this (absolute)"
    )
    release_ttft_ratio: float = Field(1.2, gt=0, description="canary p95 TTFT may be at most this x production's")
    release_speed_ratio: float = Field(
        0.9, gt=0, description="canary decode tok/s must be at least this x production's"
    )
    release_min_samples: int = Field(
        5,
        ge=2,
        description="per-request figures each variant needs in a step for the TTFT and speed checks (fewer: not "
        "compared, as for production at 100 %); their noise allowance is a bootstrap interval of the ratio",
    )
    release_latency_windows: int = Field(
        2,
        ge=1,
        description="a canary step failing on latency alone (TTFT or speed, not errors) is observed again in a fresh "
        "window, up to this many in all, and fails only if every window fails: a burst of load on the host must not "
        "roll back a model that is not slower (1: the first failing window aborts)",
    )
    release_synthetic_load: bool = Field(
        False,
        description="drive bounded synthetic traffic during canary steps "
        "(on in `ryz pipeline run`; production releases observe real traffic only)",
    )
    release_load_concurrency: int = Field(4, ge=1, description="synthetic load: concurrent clients")
    notify_webhook: str | None = Field(
        None, description="URL that gets a JSON POST for every reject, abort, pause and promotion"
    )

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


SECRET_SETTINGS = frozenset({"admin_token", "api_keys"})  # never printed: describe_settings shows them redacted
_URL_SETTINGS = frozenset({"store", "s3_endpoint_url", "qdrant_url", "hf_endpoint", "release_servers"})


def redacted(name: str, value: Any) -> Any:
    """A setting's value as it may be printed: secrets replaced by a note that they are set, credentials and
    query strings cut out of URLs, and a webhook URL's path (Slack-style webhooks carry their secret there)."""
    if value is None or value == "":
        return value
    if name in SECRET_SETTINGS:
        if name == "api_keys":
            count = len([k for k in str(value).split(",") if k.strip()])
            return f"<redacted: {count} key{'s' if count != 1 else ''}>"
        return "<redacted>"
    if name == "notify_webhook":
        return _redact_url(str(value), keep_path=False)
    if name in _URL_SETTINGS or name == "store_url":
        if isinstance(value, list):
            return [_redact_url(str(v)) for v in value]
        return _redact_url(str(value))
    return value


def _redact_url(url: str, keep_path: bool = True) -> str:
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<redacted: unparsable URL>"
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"<redacted>@{host}" if "@" in parts.netloc else host
    path = parts.path if keep_path or not parts.path.strip("/") else "/<redacted>"
    return urlunsplit((parts.scheme, netloc, path, "<redacted>" if parts.query else "", ""))


def describe_settings(settings: Settings) -> list[dict[str, Any]]:
    """Each field's effective value and its source (`env RYZ_X` or `default`); secrets redacted (`redacted`)."""
    rows = []
    for name, field in Settings.model_fields.items():
        env_name = f"RYZ_{name.upper()}"
        value = redacted(name, getattr(settings, name))
        rows.append(
            {
                "name": name,
                "env": env_name,
                "value": str(value) if isinstance(value, Path) else value,
                "source": f"env {env_name}" if env_name in os.environ else "default",
                "description": field.description or "",
            }
        )
    rows.append(
        {
            "name": "store_url",
            "env": "RYZ_STORE",
            "value": redacted("store_url", settings.store_url),
            "source": "env RYZ_STORE" if settings.store else "derived from RYZ_HOME",
            "description": "effective artifact store",
        }
    )
    for hf_name in ("HF_ENDPOINT", "HF_HOME", "HF_HUB_OFFLINE"):
        rows.append(
            {
                "name": hf_name.lower(),
                "env": hf_name,
                "value": redacted(hf_name.lower(), os.environ.get(hf_name)),
                "source": f"env {hf_name}" if hf_name in os.environ else "unset (huggingface_hub default)",
                "description": "read by huggingface_hub",
            }
        )
    return rows


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reload_settings() -> Settings:
    """Re-read the environment (tests change it)."""
    get_settings.cache_clear()
    return get_settings()
