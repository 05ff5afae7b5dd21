"""Byte-level BPE tokenizer (the `tokenizers` library) with seekformer's special tokens and chat template.

A saved tokenizer is a Hugging Face tokenizer directory: `tokenizer.json`, `tokenizer_config.json`
(class `PreTrainedTokenizerFast`, special tokens, `chat_template`) and `special_tokens_map.json`, so
`transformers.AutoTokenizer.from_pretrained(directory)` loads it and encodes, decodes and formats chats
exactly as `SeekTokenizer` does. Byte-level BPE never needs an unknown token: every string round-trips,
`decode(encode(text)) == text`.

Special tokens come first in the vocabulary: `<|pad|>` = 0, `<|begin_of_text|>` = 1,
`<|end_of_text|>` = 2 (the ids of the model presets), then the chat tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .fsio import atomic_write_text
from .data.corpus import check_sources, iter_documents
from .errors import TokenizerError

PAD, BOS, EOS = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END_OF_TURN]
CHAT_ROLES = ("system", "user", "assistant")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# The chat format of `SeekTokenizer.apply_chat_template`, in the Jinja dialect of `transformers`.
CHAT_TEMPLATE = (
    "{{ '" + BOS + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_OF_TURN + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class SeekTokenizer:
    """A byte-level BPE tokenizer. Build it with `train` or `load`; write it with `save` (or `files`).

    Attributes: `vocab_size` (int, special tokens included), `pad_token_id`, `bos_token_id`,
    `eos_token_id` (int), `system_token_id`, `user_token_id`, `assistant_token_id`,
    `end_of_turn_token_id` (int, None for a foreign tokenizer without chat tokens),
    `special_token_ids` ({token string: id}), `fingerprint` (str), `model_max_length` (int, written
    to `tokenizer_config.json`; set it to the model's context length before saving).
    """

    def __init__(self, tokenizer: Tokenizer, model_max_length: int = 4096) -> None:
        self._tok = tokenizer
        self.model_max_length = model_max_length
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t in (PAD, BOS, EOS) if ids[t] is None]
        if missing:
            raise TokenizerError(f"the tokenizer lacks the special token(s) {', '.join(missing)}; "
                                 "train a new one with SeekTokenizer.train (or `seekformer` tokenizer training)")
        self.special_token_ids: dict[str, int] = {t: i for t, i in ids.items() if i is not None}
        self.pad_token_id: int = ids[PAD]
        self.bos_token_id: int = ids[BOS]
        self.eos_token_id: int = ids[EOS]
        self.system_token_id: int | None = ids[SYSTEM]
        self.user_token_id: int | None = ids[USER]
        self.assistant_token_id: int | None = ids[ASSISTANT]
        self.end_of_turn_token_id: int | None = ids[END_OF_TURN]  # a chat model's stop token
        self._token_bytes: list[bytes] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str] | None = None, files: list[str | os.PathLike] | None = None,
              vocab_size: int = 4096, min_frequency: int = 2) -> SeekTokenizer:
        """Train on `texts` (strings, streamed) and/or the documents of `files` (any source of
        `seekformer.data.corpus.iter_documents`: text, .gz, .jsonl, directories, "builtin", "hf:NAME").

        The vocabulary holds the special tokens, the 256 byte symbols and up to
        `vocab_size - 263` merges (fewer when the text is too small to find them).
        """
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise TokenizerError(f"vocabulary too small for the byte alphabet and {len(SPECIAL_TOKENS)} special "
                                 f"tokens: use --vocab-size >= {minimum}")
        if texts is None and not files:
            raise TokenizerError("no text to train the tokenizer on: pass texts or files")
        streams: list[Iterable[str]] = []
        if texts is not None:
            streams.append([texts] if isinstance(texts, str) else texts)
        if files:
            streams.append(iter_documents(check_sources(files)))
        chars = 0

        def counted() -> Iterator[str]:
            nonlocal chars
            for stream in streams:
                for text in stream:
                    if text:
                        chars += len(text)
                        yield text

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(counted(), trainer=trainer)
        if chars == 0:
            raise TokenizerError("corpus is empty: no text to train the tokenizer on; check the data paths "
                                 "(and --text-key for JSONL / Hugging Face data)")
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SeekTokenizer:
        """Load from a directory holding `tokenizer.json` (and usually `tokenizer_config.json`),
        e.g. a tokenizer or model directory written by seekformer, or from a `tokenizer.json` file."""
        p = Path(path)
        directory, file = (p.parent, p) if p.is_file() else (p, p / TOKENIZER_FILE)
        if not file.is_file():
            raise TokenizerError(f"no {TOKENIZER_FILE} at {directory}: pass a tokenizer or model directory "
                                 "saved by seekformer, or train a tokenizer first")
        try:
            tok = Tokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - the rust loader raises plain Exceptions
            raise TokenizerError(f"cannot read {file} ({str(e).splitlines()[0]}); the file is corrupt: "
                                 "re-save or re-train the tokenizer") from None
        max_len = 4096
        cfg_file = directory / CONFIG_FILE
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
                max_len = int(cfg.get("model_max_length", max_len))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
                raise TokenizerError(f"{cfg_file} is corrupt ({e}); re-save the tokenizer") from None
        return cls(tok, model_max_length=max_len)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SeekTokenizer:
        """`load` under the `transformers` name (a local directory or `tokenizer.json`)."""
        return cls.load(path)

    # ------------------------------------------------------------------ saving
    def files(self) -> dict[str, str]:
        """{file name: content} of `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`
        (for `checkpoint.save_model(..., extra_files=tok.files())`)."""
        extra = [t for t in SPECIAL_TOKENS[3:] if t in self.special_token_ids]
        special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": EOS,
                       "additional_special_tokens": extra}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "model_max_length": self.model_max_length,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        return {
            TOKENIZER_FILE: self._tok.to_str(pretty=True),
            CONFIG_FILE: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            SPECIAL_TOKENS_MAP_FILE: json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write the three tokenizer files into `directory` (created if needed), each atomically."""
        for name, text in self.files().items():
            atomic_write_text(Path(directory) / name, text)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """`save` under the `transformers` name."""
        self.save(directory)

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the serialized `tokenizer.json`: equal fingerprints encode identically."""
        return hashlib.sha256(self._tok.to_str(pretty=True).encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings inside it map to their ids)."""
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """`encode` over a list, in parallel threads of the rust encoder."""
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (ints or a 1-D tensor/array). Incomplete UTF-8 sequences decode to U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token gives its UTF-8 text). Streaming decoders
        concatenate these and emit text only at complete UTF-8 characters."""
        if self._token_bytes is None:
            to_byte = {c: b for b, c in _bytes_to_unicode().items()}
            added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}: stored as text, not bytes
            self._token_bytes = [
                added[i].content.encode("utf-8") if i in added else bytes(to_byte[c] for c in self._tok.id_to_token(i))
                for i in range(self.vocab_size)
            ]
        token_id = int(token_id)
        if not 0 <= token_id < len(self._token_bytes):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {len(self._token_bytes)})")
        return self._token_bytes[token_id]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Format a chat: `<|begin_of_text|>`, then `<|role|>content<|end_of_turn|>` per message, then
        `<|assistant|>` when `add_generation_prompt`. `messages` are {"role", "content"} dicts with role
        system, user or assistant. Equals `transformers` `apply_chat_template(..., tokenize=False)` with
        the saved `chat_template`. Encode the result with `add_bos=False` (it already starts with BOS)."""
        parts = [BOS]
        for i, m in enumerate(messages):
            role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
            if role not in CHAT_ROLES or not isinstance(content, str):
                raise TokenizerError(f"chat message {i} must be a dict with 'role' in {CHAT_ROLES} and a "
                                     f"string 'content', got {m!r:.80}")
            parts.append(f"<|{role}|>{content}{END_OF_TURN}")
        if add_generation_prompt:
            parts.append(ASSISTANT)
        return "".join(parts)


def train_tokenizer_cli(files: list[str], vocab_size: int, out: str | os.PathLike,
                        min_frequency: int = 2) -> SeekTokenizer:
    """Train a tokenizer on the documents of `files` (checked up front: DataError when missing) and save it to `out`."""
    tok = SeekTokenizer.train(files=check_sources(files), vocab_size=vocab_size, min_frequency=min_frequency)
    tok.save(out)
    return tok
