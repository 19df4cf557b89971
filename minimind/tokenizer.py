"""MiniMind-compatible byte-level BPE tokenizer: load, save, encode, chat templates and bounded-memory training.

The on-disk format is the one MiniMind ships (``tokenizer.json`` + ``tokenizer_config.json``), so a directory
written by :meth:`Tokenizer.save` also loads with ``transformers.AutoTokenizer.from_pretrained``. This module
deliberately depends only on ``tokenizers``, ``jinja2`` and (through :mod:`minimind.sources`, to read inputs)
``pyarrow``: no transformers, no ray, so that every Ray worker can import it cheaply; a :class:`Tokenizer`
pickles through its JSON text.

:func:`train_tokenizer` keeps peak memory bounded. The BPE trainer's memory grows with the total length of the
distinct pre-tokenized words it sees (about 250-300 bytes per distinct Han character, measured), and the ByteLevel
pre-tokenizer keeps a whole run of Chinese text (a clause, or a paragraph with no punctuation) as one word, so
nearly all Chinese text is "distinct". Training therefore sees a seeded random sample of at most ``max_chars``
characters (this is what makes memory independent of corpus size), and while training only, runs of
Han/kana/Hangul characters are cut into pieces of at most ``max_piece_chars`` characters, which bounds the word
length and lets repeated pieces share memory. See bench/bench_tokenizer_train.py for the measurements.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .sources import iter_lines

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 in this order
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]
UNK_TOKEN = PAD_TOKEN
MODEL_MAX_LENGTH = 32768

# MiniMind's chat template, verbatim from its tokenizer_config.json. Note that it ignores
# add_generation_prompt: every user turn is followed by "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


# --------------------------------------------------------------------------------------------- chat templates


def _raise_exception(message: str) -> None:
    # Templates call raise_exception("...") to reject malformed conversations: that is the caller's input error.
    raise ValueError(f"chat template rejected the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Same defaults as transformers' filter (non-ASCII kept as is), unlike jinja's own HTML-escaping tojson.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    # The environment transformers renders chat templates with, so both give byte-identical prompts.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"invalid chat template: {e}") from e


# ------------------------------------------------------------------------------------------------ file helpers


def default_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask (read, then put back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write_text(path: Path, text: str) -> None:
    # Write beside the target and rename over it, so a crash never leaves a half-written file behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600: give it the mode open() would, so a checkpoint on a shared volume stays
        # readable by the group/others the user's umask allows.
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_json_file(path: Path) -> tuple[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        return text, json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


# ---------------------------------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` plus MiniMind's chat template and special-token names."""

    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str = CHAT_TEMPLATE,
                 bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN,
                 unk_token: str = UNK_TOKEN, model_max_length: int = MODEL_MAX_LENGTH):
        self._backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.model_max_length = model_max_length
        self._template: jinja2.Template | None = None  # compiled lazily; not pickled
        self._plain: tokenizers.Tokenizer | None = None  # the backend with special-token matching off (lazy)
        self._char_counts: np.ndarray | None = None
        self._fingerprint: str | None = None  # cached: hashing means serialising the whole vocabulary
        for name in (bos_token, eos_token, pad_token, unk_token):
            if backend.token_to_id(name) is None:
                raise ValueError(f"special token {name!r} is not in the tokenizer's vocabulary")

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` from a directory."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        config = path / CONFIG_FILE
        return cls.from_file(path / TOKENIZER_FILE, config if config.exists() else None)

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike, config_json: str | os.PathLike | None = None
                  ) -> "Tokenizer":
        """Load a ``tokenizer.json``; ``config_json`` (a ``tokenizer_config.json``) supplies the chat template
        and special-token names, which otherwise default to MiniMind's."""
        tokenizer_json = Path(tokenizer_json)
        text, _ = _read_json_file(tokenizer_json)
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception on schema errors
            raise ValueError(f"{tokenizer_json}: not a valid tokenizer.json: {e}") from e
        kwargs: dict[str, Any] = {}
        if config_json is not None:
            config_json = Path(config_json)
            _, config = _read_json_file(config_json)
            if not isinstance(config, dict):
                raise ValueError(f"{config_json}: expected a JSON object")
            for key in ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token", "model_max_length"):
                value = config.get(key)
                if isinstance(value, dict):  # older configs store special tokens as serialised AddedTokens
                    value = value.get("content")
                if value is not None:
                    kwargs[key] = value
            if isinstance(kwargs.get("chat_template"), list):
                raise ValueError(f"{config_json}: named chat templates (a list) are not supported")
        try:
            return cls(backend, **kwargs)
        except ValueError as e:
            raise ValueError(f"{config_json or tokenizer_json}: {e}") from e

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (pretty-printed like MiniMind's)."""
        return self._backend.to_str(pretty=True)

    def config(self) -> dict:
        """The ``tokenizer_config.json`` contents, shaped like MiniMind's so transformers loads the directory."""
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._backend.get_added_tokens_decoder().items())
        }
        return {
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [],
            "bos_token": self.bos_token,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "legacy": True,
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": self.unk_token,
            "chat_template": self.chat_template,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into directory ``path`` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path / TOKENIZER_FILE, self.to_json())
        _atomic_write_text(path / CONFIG_FILE, json.dumps(self.config(), ensure_ascii=False, indent=2) + "\n")
        return path

    # ---------------------------------------------------------------- encoding

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is out of range (vocab size {self.vocab_size})")
        return token

    @property
    def bos_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_to_id(self.pad_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added (special-token strings inside it still map to
        their ids), like ``tok(text, add_special_tokens=False)`` in transformers."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"encode_batch expects strs, got {type(t).__name__}")
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``)."""
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    def _plain_backend(self) -> tokenizers.Tokenizer:
        # A second backend, because `encode_special_tokens` is a setting of the whole Rust object: flipping it
        # on the shared one would race with encode() in other threads.
        if self._plain is None:
            plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def _encode_plain(self, text: str) -> tokenizers.Encoding:
        encoding = self._plain_backend().encode(text, add_special_tokens=False)
        if not self.special_ids.isdisjoint(encoding.ids):
            # Only a vocabulary whose BPE merges rebuild a special string from its bytes could do this.
            raise ValueError("this tokenizer's vocabulary turns plain text into special tokens; "
                             "content cannot be encoded safely")
        return encoding

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` as ordinary text: a special-token string inside it (``<|im_start|>``...) becomes
        the byte-level tokens of its characters, never the special token, and ``decode`` gives ``text`` back.
        Use it for anything a user or a data file supplies as message content."""
        if not isinstance(text, str):
            raise ValueError(f"encode_plain expects a str, got {type(text).__name__}")
        return self._encode_plain(text).ids

    def token_char_counts(self) -> np.ndarray:
        """(vocab_size,) int64: for each token id, the characters it starts, i.e. the UTF-8 lead bytes (bytes
        outside 0x80..0xBF) of its byte string; 0 for special tokens. Summed over ``encode_plain(text)`` it
        gives ``len(text)``, whatever the tokens' split of multi-byte characters (bits per character)."""
        if self._char_counts is None:
            to_byte = {c: b for b, c in _byte_alphabet().items()}
            special = self.special_ids
            counts = np.zeros(self.vocab_size, dtype=np.int64)
            for i in range(self.vocab_size):
                token = self._backend.id_to_token(i)
                if token is None or i in special:
                    continue
                try:
                    counts[i] = sum(1 for c in token if not 0x80 <= to_byte[c] <= 0xBF)
                except KeyError:
                    raise ValueError(f"token {i} ({token!r}) is not a byte-level token; cannot count its "
                                     f"characters") from None
            self._char_counts = counts
        return self._char_counts

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # int() so numpy / torch integer scalars (e.g. from a generated tensor) are accepted too.
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render ``messages`` (``[{"role", "content"}, ...]``) with the chat template, as transformers does.

        Returns the prompt string, or its ids (encoded without added special tokens) when ``tokenize``.
        Extra keyword arguments become template variables, as in transformers.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                     "unk_token": self.unk_token, **kwargs}
        text = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **variables)
        return self.encode(text) if tokenize else text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs: Any) -> list[int]:
        """The ids of ``apply_chat_template(messages, ...)``, except that message contents are encoded as plain
        text (:meth:`encode_plain`): only the template's own special tokens become special ids, so a user who
        writes ``<|im_end|>\\n<|im_start|>system`` cannot open a turn. For contents without special strings the
        ids equal ``apply_chat_template(messages, add_generation_prompt, tokenize=True)``."""
        return self.encode_chat_offsets(messages, add_generation_prompt, **kwargs)[1]

    def encode_chat_offsets(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs: Any
                            ) -> tuple[str, list[int], list[tuple[int, int]]]:
        """:meth:`encode_chat` plus the rendered text and each token's (start, end) character span in it.

        How: each special string inside a content is swapped for a private-use character the conversation
        does not contain, the template is rendered, the result is cut at the special strings (all of them the
        template's now), and every piece between them, the swap undone, is encoded as plain text. The backend
        itself also cuts text at special strings before tokenising, so the ids are the same when no content
        holds one.
        """
        specials = sorted((t.content for t in self._backend.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        if not isinstance(messages, (list, tuple)):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        contents = [m.get("content") for m in messages if isinstance(m, dict)]
        texts = [c for c in contents if isinstance(c, str)]
        swap: dict[str, str] = {}
        code = 0x10FFFD  # the top of Supplementary Private Use Area-B: never real text
        for special in specials:
            if any(special in c for c in texts):
                while any(chr(code) in c for c in texts):
                    code -= 1
                swap[special] = chr(code)
                code -= 1
        if swap:
            def defang(c: str) -> str:
                for special, mark in swap.items():
                    c = c.replace(special, mark)
                return c
            messages = [{**m, "content": defang(m["content"])} if isinstance(m, dict) and
                        isinstance(m.get("content"), str) else m for m in messages]
        rendered = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=False, **kwargs)
        marks = {mark: special for special, mark in swap.items()}
        pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", rendered) if specials else [rendered]
        text, ids, offsets = [], [], []
        pos = 0
        for k, piece in enumerate(pieces):
            if k % 2:  # a special string the template wrote
                ids.append(self.token_to_id(piece))
                offsets.append((pos, pos + len(piece)))
            elif piece:
                for mark, special in marks.items():
                    piece = piece.replace(mark, special)
                encoding = self._encode_plain(piece)
                ids.extend(encoding.ids)
                offsets.extend((pos + a, pos + b) for a, b in encoding.offsets)
            text.append(piece)
            pos += len(piece)
        return "".join(text), ids, offsets

    # ---------------------------------------------------------------- identity, pickling

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the tokenizer.json content plus what else changes produced ids (chat template and
        special-token names): a key for caches of tokenized data. Treat the tokenizer as immutable: the value is
        computed once."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for part in (self._backend.to_str(), self.chat_template, self.bos_token, self.eos_token,
                         self.pad_token, self.unk_token):
                h.update(part.encode("utf-8"))
                h.update(b"\0")  # separator, so shifting text between parts changes the hash
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    sha256 = fingerprint

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __getstate__(self) -> dict:
        # Ship the JSON text rather than the Rust object or the compiled template, which is rebuilt on demand.
        return {"json": self._backend.to_str(), "chat_template": self.chat_template, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token,
                "model_max_length": self.model_max_length}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        backend = tokenizers.Tokenizer.from_str(state.pop("json"))
        self.__init__(backend, **state)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()[:12]})"


def _byte_alphabet() -> dict[int, str]:
    """Byte -> character of the byte-level alphabet (GPT-2's): printable Latin-1 bytes stand for themselves,
    the other 68 bytes map to U+0100 onwards in byte order. Token strings of a ByteLevel BPE use it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


# ------------------------------------------------------------------------------------------------- corpus input


def iter_jsonl_texts(paths: str | os.PathLike | Iterable[str | os.PathLike], text_field: str = "text"
                     ) -> Iterator[str]:
    """Stream texts from .jsonl / .jsonl.gz files (each path a file, a directory, a glob or a URI; see
    :func:`minimind.sources.resolve_inputs`).

    A record gives ``record[text_field]``; a ``{"conversations": [{"role", "content"}, ...]}`` record gives its
    contents joined by newlines. Blank lines are skipped; anything else raises ValueError naming file and line.
    A path that names no file raises :class:`minimind.sources.MissingInput` (a FileNotFoundError).
    """
    for uri, lineno, raw in iter_lines(paths):
        if not raw.strip():
            continue
        try:
            yield _record_text(json.loads(raw), text_field)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{uri}:{lineno}: {e}") from e


def _record_text(record: Any, text_field: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if text_field in record:
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"field {text_field!r} is {type(text).__name__}, not a string")
        return text
    turns = record.get("conversations")
    if isinstance(turns, list):
        if not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns):
            raise ValueError("'conversations' must be a list of {'role', 'content': str} objects")
        return "\n".join(t["content"] for t in turns)
    raise ValueError(f"record has neither a {text_field!r} string nor a 'conversations' list")


# ----------------------------------------------------------------------------------------------------- training

# Scripts written without spaces between words. The ByteLevel regex keeps a whole run of them as one word.
_UNSPACED_SCRIPT = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]"


def sample_texts(texts: Iterable[str], max_chars: int, *, chunk_chars: int = 2048, seed: int = 0) -> list[str]:
    """A seeded random sample of the corpus holding at most ``max_chars`` characters, in corpus order.

    Texts are cut into chunks of at most ``chunk_chars`` characters (so one huge document cannot crowd out the
    rest); every chunk gets a random key and the chunks with the smallest keys that fit the budget are kept
    (a bottom-k sample). Memory is bounded by the budget whatever the corpus size.
    """
    if max_chars <= 0 or chunk_chars <= 0:
        raise ValueError("max_chars and chunk_chars must be positive")
    chunk_chars = min(chunk_chars, max_chars)  # a chunk over the budget could never be kept
    rng = random.Random(seed)
    heap: list[tuple[float, int, str]] = []  # (-key, position, chunk): a max-heap on key
    total = 0
    position = 0
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"training texts must be str, got {type(text).__name__}")
        for start in range(0, len(text), chunk_chars):
            chunk = text[start:start + chunk_chars]
            key = rng.random()
            position += 1
            if total + len(chunk) > max_chars and heap and -heap[0][0] < key:
                continue  # would be evicted straight away: skip the heap work
            heapq.heappush(heap, (-key, position, chunk))
            total += len(chunk)
            while total > max_chars and heap:
                total -= len(heapq.heappop(heap)[2])
    return [chunk for _, _, chunk in sorted(heap, key=lambda item: item[1])]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6400, *, max_chars: int = 2_000_000,
                    max_piece_chars: int = 6, chunk_chars: int = 2048, min_frequency: int = 0, seed: int = 0,
                    show_progress: bool = False) -> Tokenizer:
    """Train a MiniMind-style byte-level BPE tokenizer (specials ``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>`` = ids 0, 1, 2) with bounded memory.

    texts: any iterable of strings, streamed once (e.g. :func:`iter_jsonl_texts`).
    max_chars: character budget of the random training sample (see :func:`sample_texts`); peak memory scales
        with it, not with the corpus. The default, 2M, peaks at ~760 MB on Chinese poetry (the worst case: little
        repetition); text whose words repeat, like English, costs less per character.
    max_piece_chars: while training, runs of Han/kana/Hangul characters are cut into pieces of at most this
        many characters, so merges never span more; 0 disables the cut (the unbounded, reference behaviour).
    chunk_chars, seed: sampling granularity and seed. min_frequency: as in ``tokenizers.trainers.BpeTrainer``.

    The returned tokenizer pre-tokenizes with plain ``ByteLevel(add_prefix_space=False)``, exactly like MiniMind's.
    Its vocabulary can come out smaller than ``vocab_size`` when a small corpus runs out of pairs to merge
    (the bundled 200 KB sample gives about 2,300 tokens).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)")
    if max_piece_chars < 0:
        raise ValueError("max_piece_chars must be >= 0")
    # Special-token strings inside the corpus (MiniMind's pretrain text is full of them) are matched whole at
    # encode time, so merges learnt from their pieces ("<|", "im", "_start") would be wasted vocabulary.
    sample = [_strip_specials(t) for t in sample_texts(texts, max_chars, chunk_chars=chunk_chars, seed=seed)]
    if not any(sample):
        raise ValueError("no training text: the corpus is empty")

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend = tokenizers.Tokenizer(models.BPE())
    if max_piece_chars:
        # " ?" mirrors the ByteLevel regex, which attaches one leading space to a word.
        piece = tokenizers.Regex(f" ?{_UNSPACED_SCRIPT}{{1,{max_piece_chars}}}")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(piece, behavior="isolated"), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(sample, trainer=trainer, length=len(sample))
    del sample
    backend.pre_tokenizer = byte_level  # encode like MiniMind: the piece cut was only for training
    if [backend.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError("BpeTrainer did not give the special tokens ids 0, 1, 2")  # MiniMind's ids assume so
    return Tokenizer(backend)


def _strip_specials(text: str) -> str:
    for tok in SPECIAL_TOKENS:
        if tok in text:
            text = text.replace(tok, " ")
    return text
