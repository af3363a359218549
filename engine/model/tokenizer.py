"""The artifact's tokenizer: the Hugging Face tokenizer.json stored in the GGUF metadata, and the checks every tokenizer
file a model brings passes before it is used (a checkpoint's tokenizer.json, tokenizer_config.json with its chat
template and special_tokens_map.json; the copies a GGUF carries in its metadata).

Special-token text in client text is text (docs/serving.md, "Special tokens in client text are text"):
`encode` (completions prompts) does not parse a `<|eot_id|>` a client wrote as the special token, and a chat prompt
rendered by engine.serving.chat.render_chat from a `ChatTemplate` is a `ChatPrompt` that remembers which of its
characters are special-token text the client wrote, so `encode_chat` keeps the template's own markers special and the
client's as text. `parse_special` (RYZ_PARSE_SPECIAL) parses both as special tokens instead.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from tokenizers import Tokenizer

from engine.errors import TokenizerFileError
from engine.settings import get_settings

# Llama 3's tokenizer.json is 9 MB, Gemma 3's 33 MB; the largest real chat templates are tens of kB.
MAX_TOKENIZER_JSON_BYTES = 128 << 20
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20  # tokenizer_config.json and special_tokens_map.json (added_tokens_decoder)
MAX_CHAT_TEMPLATE_CHARS = 256 << 10
_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplate(str):
    """A model's chat template text, carrying its tokenizer's `special_spans`, so that rendering
    (engine.serving.chat.render_chat) can keep special-token text in client strings from becoming special tokens."""

    special_spans: Callable[[str], list[tuple[int, int]]] | None

    def __new__(cls, text: str, special_spans: Callable[[str], list[tuple[int, int]]] | None = None):
        self = super().__new__(cls, text)
        self.special_spans = special_spans
        return self


class ChatPrompt(str):
    """A rendered chat prompt and `client_special`: the (start, end) character spans of special-token text that came
    from the client (message contents, tool calls, tools), which `ModelTokenizer.encode_chat` tokenizes as text. A
    plain str (or a ChatPrompt changed by str operations, which return plain str) carries no spans."""

    client_special: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, client_special: tuple[tuple[int, int], ...] = ()):
        self = super().__new__(cls, text)
        self.client_special = client_special
        return self


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' AssistantTracker marks assistant spans for training
    masks); when rendering a prompt it just renders its body. Part of the chat-template dialect: the syntax check
    here and the renderer in engine.serving.chat both use it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class ModelTokenizer:
    def __init__(self, model_file, parse_special: bool | None = None):
        """The tokenizer of an opened model file (engine.model.ggufio.ModelFile), its tokenizer.json and chat
        template checked first (TokenizerFileError naming the metadata key and field). `parse_special`: parse
        special-token text in client text as special tokens (default: RYZ_PARSE_SPECIAL, off)."""
        path = getattr(model_file, "path", None)
        where = f"{path}: metadata" if path is not None else "the model's metadata"
        hparams = getattr(model_file, "hparams", None)
        vocab = hparams.vocab if hparams is not None else None
        self.tokenizer = load_tokenizer_json(
            model_file.tokenizer_json,
            f"{where} {gguf.Keys.Tokenizer.HF_JSON} (tokenizer.json)",
            vocab,
            f"{getattr(model_file, 'arch', 'the model')}.vocab_size",
        )
        n_ids = vocab or self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = _special_id(model_file, gguf.Keys.Tokenizer.BOS_ID, n_ids, where)
        self.eos_id = _special_id(model_file, gguf.Keys.Tokenizer.EOS_ID, n_ids, where)
        add_bos = model_file.metadata.get(gguf.Keys.Tokenizer.ADD_BOS)
        self.add_bos = bool(add_bos) if add_bos is not None else self.bos_id is not None
        self.parse_special = get_settings().parse_special if parse_special is None else parse_special
        added = self.tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special and token.content)
        self._special_starts = frozenset(added[i].content[0] for i in self.special_ids)
        template = check_chat_template(model_file.chat_template, f"{where} {gguf.Keys.Tokenizer.CHAT_TEMPLATE}")
        self.chat_template = ChatTemplate(template, self.special_spans) if template else template
        # Stop at eos and at any end-of-turn marker the vocabulary has.
        self.stop_ids = {i for i in (self.eos_id, self.tokenizer.token_to_id("<|eot_id|>")) if i is not None}

    def encode(self, text: str) -> list[int]:
        """Ids of a prompt given as text (completions): special-token text in it is text unless parse_special."""
        tokenizer = self.tokenizer if self.parse_special else self._text_tokenizer
        ids = tokenizer.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]  # tokenizer.json files without a post-processor leave bos to us
        return ids

    def encode_chat(self, text: str) -> list[int]:
        """Ids of a rendered chat prompt. The template already wrote the special tokens (usually bos
        first), so the post-processor adds nothing and bos is prepended only when the model wants one
        and the text does not start with it: exactly one bos either way. The special-token text a client wrote
        (`text.client_special` of a ChatPrompt) is tokenized as text unless parse_special; the text around it is
        tokenized as usual, so a prompt without any gets the same ids as one tokenized whole."""
        spans = () if self.parse_special else getattr(text, "client_special", ())
        if not spans:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        else:
            ids, pos = [], 0
            for start, end in spans:
                if start > pos:
                    ids += self.tokenizer.encode(text[pos:start], add_special_tokens=False).ids
                ids += self._text_tokenizer.encode(text[start:end], add_special_tokens=False).ids
                pos = end
            if pos < len(text):
                ids += self.tokenizer.encode(text[pos:], add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def special_spans(self, text: str) -> list[tuple[int, int]]:
        """The (start, end) character spans of `text` the tokenizer would read as special tokens."""
        if not self.special_ids or not any(c in text for c in self._special_starts):
            return []
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return [span for token, span in zip(encoding.ids, encoding.offsets) if token in self.special_ids]

    @functools.cached_property
    def _text_tokenizer(self) -> Tokenizer:
        """A copy of the tokenizer that reads special-token text as text (its own object: the flag is per
        tokenizer, and requests tokenize on several threads)."""
        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.encode_special_tokens = True
        return tokenizer


# --- checks of the files a model brings ---------------------------------------------------------------------


def read_tokenizer_files(path: str | Path, vocab: int) -> tuple[str, dict]:
    """A checkpoint directory's tokenizer files, read and checked before anything uses them: tokenizer.json's text
    (its ids inside the model's `vocab` from config.json), tokenizer_config.json (or {} when absent; its chat
    template valid Jinja) and special_tokens_map.json when present. Raises TokenizerFileError naming the file and
    the field."""
    path = Path(path)
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise TokenizerFileError(
            f"{path}: tokenizer.json is missing; Ryzanstein needs the fast tokenizer file (save it with "
            f"tokenizer.save_pretrained)"
        )
    text = _read_text(tokenizer_path, MAX_TOKENIZER_JSON_BYTES)
    load_tokenizer_json(text, str(tokenizer_path), vocab, "config.json vocab_size")
    config: dict = {}
    config_path = path / "tokenizer_config.json"
    if config_path.is_file():
        doc = _parse_json(_read_text(config_path, MAX_TOKENIZER_CONFIG_BYTES), config_path)
        config = check_tokenizer_config(doc, str(config_path))
    special_path = path / "special_tokens_map.json"
    if special_path.is_file():
        doc = _parse_json(_read_text(special_path, MAX_TOKENIZER_CONFIG_BYTES), special_path)
        check_special_tokens_map(doc, str(special_path))
    return text, config


def load_tokenizer_json(text, where: str, vocab: int | None = None, vocab_from: str = "") -> Tokenizer:
    """A tokenizer.json's text checked and loaded: a JSON object of at most MAX_TOKENIZER_JSON_BYTES, its model a
    known layout, every token id an integer inside the model's `vocab` ids (named by `vocab_from`), added tokens
    well formed, then loaded by the tokenizers library. TokenizerFileError names `where` and the field."""
    if not isinstance(text, str):
        raise TokenizerFileError(f"{where}: must be text (a JSON document), got {type(text).__name__}")
    if len(text) > MAX_TOKENIZER_JSON_BYTES:
        raise TokenizerFileError(
            f"{where}: {len(text)} characters, over the {_size(MAX_TOKENIZER_JSON_BYTES)} a tokenizer.json may have; "
            "this is not a real tokenizer"
        )
    spec = _parse_json(text, where)
    if not isinstance(spec, dict):
        raise TokenizerFileError(f"{where}: must be a JSON object, got {_kind(spec)}")
    _check_spec(spec, where, vocab, vocab_from)
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - the Rust loader raises a bare Exception with serde's message
        raise TokenizerFileError(f"{where}: the tokenizers library cannot load it: {exc}") from None
    if vocab is not None:  # what the library made of it (e.g. a Unigram vocabulary without its "type")
        ids = tokenizer.get_vocab(with_added_tokens=True)
        top = max(ids.values(), default=-1)
        if top >= vocab:
            token = next(t for t, i in ids.items() if i == top)
            raise TokenizerFileError(_outside(where, f"token {token!r}", top, vocab, vocab_from))
    return tokenizer


def check_tokenizer_config(doc, where: str = "tokenizer_config.json") -> dict:
    """tokenizer_config.json's fields Ryzanstein reads, checked: the special tokens (a string or {"content": ...}),
    add_bos_token / add_eos_token (booleans), added_tokens_decoder and chat_template (check_chat_template)."""
    if not isinstance(doc, dict):
        raise TokenizerFileError(f"{where}: must be a JSON object, got {_kind(doc)}")
    for key in _TOKEN_FIELDS:
        _check_token_field(doc.get(key), f"{where}: {key}")
    for key in ("add_bos_token", "add_eos_token"):
        if key in doc and doc[key] is not None and not isinstance(doc[key], bool):
            raise TokenizerFileError(f"{where}: {key} must be true or false, got {_kind(doc[key])}")
    decoder = doc.get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise TokenizerFileError(f"{where}: added_tokens_decoder must be an object, got {_kind(decoder)}")
        for key, token in decoder.items():
            if not (isinstance(token, dict) and isinstance(token.get("content"), str)):
                raise TokenizerFileError(f'{where}: added_tokens_decoder["{key}"] must be {{"content": "...", ...}}')
    check_chat_template(doc.get("chat_template"), f"{where}: chat_template")
    return doc


def check_special_tokens_map(doc, where: str = "special_tokens_map.json") -> dict:
    """special_tokens_map.json checked: each special token a string or {"content": ...}, additional_special_tokens
    a list of them."""
    if not isinstance(doc, dict):
        raise TokenizerFileError(f"{where}: must be a JSON object, got {_kind(doc)}")
    for key in _TOKEN_FIELDS:
        _check_token_field(doc.get(key), f"{where}: {key}")
    extra = doc.get("additional_special_tokens")
    if extra is not None:
        if not isinstance(extra, list):
            raise TokenizerFileError(f"{where}: additional_special_tokens must be a list, got {_kind(extra)}")
        for i, token in enumerate(extra):
            _check_token_field(token, f"{where}: additional_special_tokens[{i}]", allow_none=False)
    return doc


def check_chat_template(template, where: str = "chat_template") -> str | None:
    """A chat template checked before use: text (or transformers' list of {"name", "template"}: every entry is
    checked, the "default" one returned) of at most MAX_CHAT_TEMPLATE_CHARS that compiles as Jinja with the
    chat-template dialect. Syntax errors are a TokenizerFileError with the template line, not a Jinja traceback.
    None or "" (no template) is returned as is."""
    if template is None or template == "":
        return template
    if isinstance(template, list):
        chosen = None
        for i, entry in enumerate(template):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
                raise TokenizerFileError(f'{where}[{i}] must be {{"name": "...", "template": "..."}}')
            text = check_chat_template(entry.get("template"), f"{where}[{i}].template")
            if entry["name"] == "default":
                chosen = text
        return chosen
    if not isinstance(template, str):
        raise TokenizerFileError(f"{where}: must be a string, got {_kind(template)}")
    if len(template) > MAX_CHAT_TEMPLATE_CHARS:
        raise TokenizerFileError(
            f"{where}: {len(template)} characters, over the {MAX_CHAT_TEMPLATE_CHARS >> 10} KiB a chat template may "
            "have; this is not a real chat template"
        )
    try:
        _syntax_environment().compile(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerFileError(
            f"{where}: not valid Jinja: {exc.message} (template line {exc.lineno}); fix the chat_template"
        ) from None
    except (SyntaxError, RecursionError, MemoryError, OverflowError) as exc:  # nests past what Python compiles
        raise TokenizerFileError(f"{where}: cannot be compiled ({type(exc).__name__}: {exc})") from None
    return template


@functools.cache
def _syntax_environment() -> jinja2.Environment:
    return jinja2.Environment(extensions=[GenerationTag, loopcontrols])


def _check_spec(spec: dict, where: str, n_ids: int | None, vocab_from: str) -> None:
    """Structure of a parsed tokenizer.json, every id below `n_ids` (the model's vocabulary) when given."""
    model = spec.get("model")
    if not isinstance(model, dict):
        raise TokenizerFileError(f"{where}: model must be an object, got {_kind(model)}")
    kind = model.get("type")
    if kind is not None and not isinstance(kind, str):
        raise TokenizerFileError(f"{where}: model.type must be a string, got {_kind(kind)}")
    vocab = model.get("vocab")
    if kind == "Unigram":
        if not isinstance(vocab, list):
            raise TokenizerFileError(f"{where}: model.vocab of a Unigram model must be a list, got {_kind(vocab)}")
        for i, entry in enumerate(vocab):
            if not (
                isinstance(entry, list)
                and len(entry) == 2
                and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float))
                and not isinstance(entry[1], bool)
            ):
                raise TokenizerFileError(f"{where}: model.vocab[{i}] must be [piece, score], got {_short(entry)}")
        if n_ids is not None and len(vocab) > n_ids:
            raise TokenizerFileError(_outside(where, f"model.vocab[{n_ids}]", n_ids, n_ids, vocab_from))
    elif vocab is not None:
        if not isinstance(vocab, dict):
            raise TokenizerFileError(f"{where}: model.vocab must be an object of token: id, got {_kind(vocab)}")
        for token, idx in vocab.items():
            if not _is_id(idx):
                raise TokenizerFileError(
                    f"{where}: model.vocab[{token!r}] must be a token id (an integer >= 0), got {_short(idx)}"
                )
            if n_ids is not None and idx >= n_ids:
                raise TokenizerFileError(_outside(where, f"model.vocab[{token!r}]", idx, n_ids, vocab_from))
    merges = model.get("merges")
    if merges is not None:
        if not isinstance(merges, list):
            raise TokenizerFileError(f"{where}: model.merges must be a list, got {_kind(merges)}")
        for i, merge in enumerate(merges):
            pair = isinstance(merge, list) and len(merge) == 2 and all(isinstance(m, str) for m in merge)
            if not (pair or isinstance(merge, str)):
                raise TokenizerFileError(f'{where}: model.merges[{i}] must be "a b" or ["a", "b"], got {_short(merge)}')
    added = spec.get("added_tokens", [])
    if added is None:
        added = []
    if not isinstance(added, list):
        raise TokenizerFileError(f"{where}: added_tokens must be a list, got {_kind(added)}")
    for i, token in enumerate(added):
        if not isinstance(token, dict):
            raise TokenizerFileError(f"{where}: added_tokens[{i}] must be an object, got {_kind(token)}")
        if not _is_id(token.get("id")):
            raise TokenizerFileError(
                f"{where}: added_tokens[{i}].id must be a token id (an integer >= 0), got {_short(token.get('id'))}"
            )
        if not isinstance(token.get("content"), str) or not token["content"]:
            raise TokenizerFileError(
                f"{where}: added_tokens[{i}].content must be a non-empty string, got {_short(token.get('content'))}"
            )
        if "special" in token and not isinstance(token["special"], bool):
            raise TokenizerFileError(f"{where}: added_tokens[{i}].special must be true or false")
        if n_ids is not None and token["id"] >= n_ids:
            raise TokenizerFileError(
                _outside(where, f"added_tokens[{i}] ({token['content'][:40]!r})", token["id"], n_ids, vocab_from)
            )


def _outside(where: str, what: str, idx: int, n_ids: int, vocab_from: str) -> str:
    return (
        f"{where}: {what} has id {idx}, outside the model's {n_ids} token ids ({vocab_from}); the tokenizer does not "
        "belong to this model"
    )


def _check_token_field(value, where: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerFileError(f'{where} must be a string or {{"content": "..."}}, got {_kind(value)}')


def _special_id(model_file, key: str, n_ids: int, where: str) -> int | None:
    try:
        value = model_file.special_token(key)
    except (TypeError, ValueError, OverflowError):
        raise TokenizerFileError(f"{where} {key}: not a token id ({_short(model_file.metadata.get(key))})") from None
    if value is not None and not 0 <= value < n_ids:
        raise TokenizerFileError(f"{where} {key}: token id {value} is outside the model's {n_ids} token ids")
    return value


def _read_text(path: Path, limit: int) -> str:
    size = path.stat().st_size
    if size > limit:
        raise TokenizerFileError(
            f"{path}: {size} bytes, over the {_size(limit)} this file may have; this is not a real tokenizer file"
        )
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerFileError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _parse_json(text: str, where) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerFileError(f"{where}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise TokenizerFileError(f"{where}: invalid JSON (nested too deeply)") from None


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
