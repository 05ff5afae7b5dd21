"""Tokenizers as `transformers` reads them: `tokenizer.json` + `tokenizer_config.json`, any special tokens.

`SeekTokenizer.load(directory)` reads a Hugging Face tokenizer directory -- seekformer's own, DeepSeek's
(`<｜begin▁of▁sentence｜>` ...) or any other fast tokenizer: bos/eos/pad/unk are taken BY NAME from
`tokenizer_config.json` (strings or `AddedToken` dicts), tokens listed in its `added_tokens_decoder`
but missing from `tokenizer.json` are added, and the `chat_template` (in the config or in
`chat_template.jinja`) renders chats exactly as `AutoTokenizer.apply_chat_template` does (sandboxed
Jinja, see `seekformer.chat_template`). `end_of_turn_token_ids` are the special tokens the template puts
after an assistant message (`<|end_of_turn|>` here, `<｜end▁of▁sentence｜>` for DeepSeek): generation
stops there.

`SeekTokenizer.train` builds seekformer's own byte-level BPE: special tokens first (`<|pad|>` = 0,
`<|begin_of_text|>` = 1, `<|end_of_text|>` = 2, the ids of the model presets), then the chat tokens; its
chat template is written into `tokenizer_config.json`, the one place it is read from afterwards.
Byte-level BPE never needs an unknown token: `decode(encode(text)) == text`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .chat_template import render_chat
from .fsio import atomic_write_text
from .data.corpus import check_sources, iter_documents
from .errors import TokenizerError

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>"
TOOL = "<|tool|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END_OF_TURN, TOOL]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 may keep the template instead

# The chat format written into the tokenizer_config.json of tokenizers seekformer trains (read back from
# there, never from here): `<|role|>content<|end_of_turn|>` per message; tools are listed in a system
# turn, an assistant's tool calls are JSON objects {"name": ..., "arguments": {...}} one per line.
SEEK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>Tools you may call (reply with one JSON object {\"name\": ..., "
    "\"arguments\": {...}} per call): ' + tools | tojson + '<|end_of_turn|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('chat roles must be system, user, assistant or tool, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is defined and message['content'] is not none %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{% elif not message.get('tool_calls') %}{{ raise_exception('message ' + message['role'] + ' has no content') }}"
    "{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% set args = call['function']['arguments'] %}"
    "{{ ('\n' if not loop.first or message['content'] else '') + '{\"name\": ' + call['function']['name'] | tojson"
    " + ', \"arguments\": ' + (args if args is string else args | tojson) + '}' }}"
    "{% endfor %}"
    "{{ '<|end_of_turn|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CHAT_TEMPLATE = SEEK_CHAT_TEMPLATE  # kept as a name for old imports: what `train` writes, not what is read


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _seek_config() -> dict:
    """tokenizer_config.json of a tokenizer seekformer trains."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "unk_token": EOS, "additional_special_tokens": SPECIAL_TOKENS[3:], "add_bos_token": False,
            "add_eos_token": False, "clean_up_tokenization_spaces": False, "chat_template": SEEK_CHAT_TEMPLATE}


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
    """A fast (`tokenizers`) tokenizer with the special tokens and chat template of its directory.

    Build it with `train` or `load`; write it with `save` (or `files`). Attributes: `vocab_size` (int,
    added tokens included), `bos_token`/`eos_token`/`pad_token`/`unk_token` (str or None, from
    tokenizer_config.json), `bos_token_id` (int or None), `eos_token_id` (int), `pad_token_id` (int, eos
    when the config names no pad), `chat_template` (str or None), `end_of_turn_token_ids` (tuple),
    `special_token_ids` ({token string: id} of every special token), `system_token_id`,
    `user_token_id`, `assistant_token_id`, `end_of_turn_token_id` (seekformer's chat tokens; None for a
    tokenizer without them), `fingerprint` (str), `model_max_length` (int; set it to the model's context
    length before saving), `config` (the tokenizer_config.json dict, re-written on save).
    """

    def __init__(self, tokenizer: Tokenizer, model_max_length: int | None = None, config: dict | None = None,
                 chat_template: str | None = None) -> None:
        self._tok = tokenizer
        if config is None:  # a bare tokenizer.json: seekformer's token names when it has them
            config = _seek_config() if tokenizer.token_to_id(EOS) is not None else {}
            config.pop("chat_template", None)
        self.config = dict(config)
        if chat_template is not None:
            self.config["chat_template"] = chat_template
        self.model_max_length = int(model_max_length or self.config.get("model_max_length") or 4096)
        if self.model_max_length > 10**9:  # transformers' "no limit" sentinel
            self.model_max_length = 4096
        self._add_config_tokens()
        names = {k: _token_name(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        for key, name in names.items():
            if name is not None and tokenizer.token_to_id(name) is None:
                raise TokenizerError(f"{CONFIG_FILE} names {key} {name!r}, which is not in {TOKENIZER_FILE}: "
                                     "the two files do not belong together; re-save the tokenizer")
        if names["eos_token"] is None:
            raise TokenizerError(f"the tokenizer has no eos_token: set \"eos_token\" in {CONFIG_FILE} to the token "
                                 "that ends a text (e.g. \"</s>\")")
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        self.pad_token = names["pad_token"] or self.eos_token
        self.unk_token = names["unk_token"]
        self.bos_token_id: int | None = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id: int = tokenizer.token_to_id(self.eos_token)
        self.pad_token_id: int = tokenizer.token_to_id(self.pad_token)
        specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        for name in names.values():
            if name is not None:
                specials[name] = tokenizer.token_to_id(name)
        self.special_token_ids: dict[str, int] = dict(sorted(specials.items(), key=lambda kv: kv[1]))
        self.system_token_id: int | None = tokenizer.token_to_id(SYSTEM)
        self.user_token_id: int | None = tokenizer.token_to_id(USER)
        self.assistant_token_id: int | None = tokenizer.token_to_id(ASSISTANT)
        self._token_bytes: list[bytes] | None = None
        self._end_of_turn: tuple[int, ...] | None = None

    def _add_config_tokens(self) -> None:
        """Tokens of `added_tokens_decoder` / `additional_special_tokens` missing from tokenizer.json are
        added, as transformers does (so both assign the same ids)."""
        decoder = self.config.get("added_tokens_decoder") or {}
        extra = [_token_name(t) for t in (self.config.get("additional_special_tokens")
                                          or self.config.get("extra_special_tokens") or [])]
        if isinstance(decoder, dict):
            for idx, spec in sorted(decoder.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
                name = _token_name(spec)
                if name is None or self._tok.token_to_id(name) is not None:
                    continue
                special = bool(spec.get("special", True)) if isinstance(spec, dict) else True
                token = AddedToken(name, special=special, normalized=bool(spec.get("normalized", not special))
                                   if isinstance(spec, dict) else False)
                (self._tok.add_special_tokens if special else self._tok.add_tokens)([token])
        missing = [t for t in extra if t is not None and self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str] | None = None, files: list[str | os.PathLike] | None = None,
              vocab_size: int = 4096, min_frequency: int = 2, progress: bool = False) -> SeekTokenizer:
        """Train on `texts` (strings, streamed) and/or the documents of `files` (any source of
        `seekformer.data.corpus.iter_documents`: text, .gz, .jsonl, directories, "builtin", "hf:NAME").

        The vocabulary holds the special tokens, the 256 byte symbols and up to
        `vocab_size - 256 - len(SPECIAL_TOKENS)` merges (fewer when the text is too small to find them).
        `progress` shows the `tokenizers` progress bar.
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
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(counted(), trainer=trainer)
        if chars == 0:
            raise TokenizerError("corpus is empty: no text to train the tokenizer on; check the data paths "
                                 "(and --text-key for JSONL / Hugging Face data)")
        logger.info("trained a %d-token BPE vocabulary on %d characters", tok.get_vocab_size(), chars)
        return cls(tok, config=_seek_config())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SeekTokenizer:
        """Load from a directory holding `tokenizer.json` (and usually `tokenizer_config.json`, maybe
        `chat_template.jinja`) -- any Hugging Face fast-tokenizer directory -- or from a `tokenizer.json`."""
        p = Path(path)
        directory, file = (p.parent, p) if p.is_file() else (p, p / TOKENIZER_FILE)
        if not file.is_file():
            raise TokenizerError(f"no {TOKENIZER_FILE} at {directory}: pass a tokenizer or model directory with a "
                                 "fast tokenizer (tokenizer.json), or train a tokenizer first")
        try:
            tok = Tokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - the rust loader raises plain Exceptions
            raise TokenizerError(f"cannot read {file} ({str(e).splitlines()[0]}); the file is corrupt: "
                                 "re-save or re-train the tokenizer") from None
        config = None
        cfg_file = directory / CONFIG_FILE
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
                if not isinstance(config, dict):
                    raise TypeError("not a JSON object")
                int(config.get("model_max_length") or 0)
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, OverflowError) as e:
                raise TokenizerError(f"{cfg_file} is corrupt ({e}); re-save the tokenizer") from None
        template = None
        if (directory / TEMPLATE_FILE).is_file():
            template = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
        elif isinstance((config or {}).get("chat_template"), list):  # [{"name", "template"}]: take "default"
            named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(tok, config=config, chat_template=template)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SeekTokenizer:
        """`load` under the `transformers` name (a local directory or `tokenizer.json`)."""
        return cls.load(path)

    # ------------------------------------------------------------------ saving
    def files(self) -> dict[str, str]:
        """{file name: content} of `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`
        (for `checkpoint.save_model(..., extra_files=tok.files())`). The loaded config is kept; the
        chat template goes into tokenizer_config.json."""
        config = {k: v for k, v in self.config.items() if k != "added_tokens_decoder"}
        config["model_max_length"] = self.model_max_length
        if "additional_special_tokens" in config:
            config["additional_special_tokens"] = [
                t for t in config["additional_special_tokens"] if self._tok.token_to_id(_token_name(t) or "") is not None]
        special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token",
                                              "additional_special_tokens") if config.get(k) is not None}
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

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        bos = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        return bos + ids + ([self.eos_token_id] if add_eos else [])

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
        """The raw bytes of one token (an added token gives its UTF-8 text). Streaming decoders
        concatenate these and emit text only at complete UTF-8 characters."""
        if self._token_bytes is None:
            to_byte = {c: b for b, c in _bytes_to_unicode().items()}
            added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}: stored as text, not bytes
            self._token_bytes = [
                added[i].content.encode("utf-8") if i in added else _piece_bytes(self._tok.id_to_token(i), to_byte)
                for i in range(self.vocab_size)
            ]
        token_id = int(token_id)
        if token_id < 0:
            raise TokenizerError(f"token id {token_id} is negative")
        # ids past the tokenizer's vocabulary (a model's padded embedding rows) decode to nothing, as in transformers
        return self._token_bytes[token_id] if token_id < len(self._token_bytes) else b""

    # ------------------------------------------------------------------ chat
    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        return template if isinstance(template, str) and template else None

    def check_chat_template(self) -> None:
        """Raise TokenizerError (saying how to fix it) when the tokenizer has no chat template."""
        if self.chat_template is None:
            raise TokenizerError(
                "this tokenizer has no chat template: add a \"chat_template\" (Jinja) to tokenizer_config.json "
                "(e.g. copy the one of the model's instruct version), or use `seekformer generate` on plain text")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, tokenize: bool = False, **variables) -> str | list[int]:
        """Render a chat with the directory's `chat_template`, as `transformers` does: the text (or, with
        `tokenize`, its ids, encoded without adding special tokens). `messages` are {"role", "content"}
        dicts (plus e.g. "tool_calls"); `tools` are OpenAI function specs. Raises TokenizerError when the
        tokenizer has no template or the template refuses the conversation."""
        self.check_chat_template()
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token, "pad_token": self.pad_token,
                     "unk_token": self.unk_token, **variables}
        text = render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           tools=tools, **variables)
        return self.encode(text) if tokenize else text

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                 **variables) -> list[int]:
        """Token ids of a rendered chat: equal to `AutoTokenizer.apply_chat_template(messages,
        add_generation_prompt=...)` for the same directory."""
        return self.apply_chat_template(messages, add_generation_prompt, tools, tokenize=True, **variables)

    @property
    def end_of_turn_token_ids(self) -> tuple[int, ...]:
        """The added tokens the chat template writes right after an assistant message's content (where a
        reply ends); () without a template."""
        if self._end_of_turn is None:
            self._end_of_turn = ()
            if self.chat_template is not None:
                marker = "\x00seekformer-end-of-turn-probe\x00"
                try:
                    text = self.apply_chat_template([{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": marker}],
                                                    add_generation_prompt=False)
                except TokenizerError:
                    text = ""
                if marker in text:
                    added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
                    ids = []
                    for i in self.encode(text.split(marker, 1)[1].lstrip(" ")):
                        if self._tok.id_to_token(i) not in added:
                            break
                        ids.append(i)
                    self._end_of_turn = tuple(ids)
        return self._end_of_turn

    @property
    def end_of_turn_token_id(self) -> int | None:
        """The first end-of-turn token (None when the template marks none)."""
        return self.end_of_turn_token_ids[0] if self.end_of_turn_token_ids else None

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """eos and every end-of-turn token, deduplicated (what generation_config.json lists as eos_token_id)."""
        return tuple(dict.fromkeys((self.eos_token_id, *self.end_of_turn_token_ids)))


def _piece_bytes(piece: str, to_byte: dict[str, int]) -> bytes:
    """Bytes of a vocabulary entry: byte-level BPE symbols, SentencePiece byte-fallback `<0xNN>`, or `▁` text."""
    if all(c in to_byte for c in piece):
        return bytes(to_byte[c] for c in piece)
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def train_tokenizer_cli(files: list[str], vocab_size: int, out: str | os.PathLike,
                        min_frequency: int = 2) -> SeekTokenizer:
    """Train a tokenizer on the documents of `files` (checked up front: DataError when missing) and save it to `out`."""
    tok = SeekTokenizer.train(files=check_sources(files), vocab_size=vocab_size, min_frequency=min_frequency,
                              progress=True)
    tok.save(out)
    return tok
