"""SeekTokenizer: training, round trips, saving/loading, `transformers` compatibility, errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seekformer.errors import DataError, SeekformerError, TokenizerError
from seekformer.tokenizer import SEEK_CHAT_TEMPLATE, SPECIAL_TOKENS, SeekTokenizer, train_tokenizer_cli

TEXTS = [
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse.",
    "Héllo wörld! Ça va? Ñandú, façade, naïve café, Straße, Øresund, ﬁne.",
    "Emoji: 🤖🚀👩🏽‍💻 and CJK 東京都 한국어 and Greek λόγος, Cyrillic привет.",
    "Numbers 12345 67.89 and code: def f(x): return x ** 2  # comment\n\tindented\r\nline",
] * 20

UNICODE_SAMPLES = [
    "",
    " leading and trailing spaces  ",
    "Héllo wörld — naïve café, über, São Paulo, Ångström",
    "emoji 🤖 👩🏽‍💻 🇯🇵 and zero-width joiner",
    "中文字符 日本語のテキスト 한국어",
    "tabs\tand\nnewlines\r\n\n\nand \x00 control \x7f chars",
    "<|user|> special text inside <|end_of_turn|> a string",
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Héllo 🤖, what is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And\nnow?"},
]


@pytest.fixture(scope="module")
def tok() -> SeekTokenizer:
    return SeekTokenizer.train(texts=TEXTS, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.model_max_length = 512
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def hf_tok(saved):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved))


def test_special_token_ids_and_vocab(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.special_token_ids == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert (tok.system_token_id, tok.user_token_id, tok.assistant_token_id, tok.end_of_turn_token_id) == (3, 4, 5, 6)
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_round_trip_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    if "<|" not in text:
        assert tok.decode(ids) == text


@settings(max_examples=60, deadline=None, database=None)
@given(st.text(max_size=60))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_encode_options_and_batch(tok):
    ids = tok.encode("Call me Ishmael.")
    assert tok.encode("Call me Ishmael.", add_bos=True, add_eos=True) == [1, *ids, 2]
    batch = tok.encode_batch(UNICODE_SAMPLES, add_eos=True)
    assert batch == [tok.encode(t, add_eos=True) for t in UNICODE_SAMPLES]
    assert tok.decode([1, *ids, 2]) == "Call me Ishmael."  # special tokens skipped by default


def test_token_bytes_split_utf8(tok):
    ids = tok.encode("🤖")  # a 4-byte character the small vocabulary has no merge for
    assert len(ids) > 1 and all(len(tok.token_bytes(i)) < 4 for i in ids)
    assert tok.token_bytes(tok.bos_token_id) == b"<|begin_of_text|>"
    assert tok.token_bytes(tok.vocab_size) == b""  # a model's padded embedding rows decode to nothing
    with pytest.raises(TokenizerError):
        tok.token_bytes(-1)


def test_chat_template(tok):
    text = tok.apply_chat_template(MESSAGES)
    assert text == ("<|begin_of_text|><|system|>You are terse.<|end_of_turn|><|user|>Héllo 🤖, what is 2+2?"
                    "<|end_of_turn|><|assistant|>4.<|end_of_turn|><|user|>And\nnow?<|end_of_turn|><|assistant|>")
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == text[: -len("<|assistant|>")]
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.special_token_ids["<|assistant|>"]
    with pytest.raises(TokenizerError, match="chat roles must be"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(TokenizerError):
        tok.apply_chat_template([{"role": "user"}])
    assert tok.end_of_turn_token_ids == (tok.special_token_ids["<|end_of_turn|>"],) == (tok.end_of_turn_token_id,)
    assert tok.stop_token_ids == (tok.eos_token_id, tok.end_of_turn_token_id)


def test_save_load(tok, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                      "tokenizer_config.json"]
    assert set(tok.files()) == {p.name for p in saved.iterdir()}
    cfg = json.loads((saved / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["chat_template"] == SEEK_CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == tuple(SPECIAL_TOKENS[1:3]) + (SPECIAL_TOKENS[0],)
    loaded = SeekTokenizer.load(saved)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.model_max_length == 512
    assert loaded.encode_batch(UNICODE_SAMPLES) == tok.encode_batch(UNICODE_SAMPLES)
    assert SeekTokenizer.load(saved / "tokenizer.json").vocab_size == tok.vocab_size


def test_transformers_style_names(tok, tmp_path):
    tok.save_pretrained(tmp_path / "t")
    assert SeekTokenizer.from_pretrained(tmp_path / "t").fingerprint == tok.fingerprint


def test_transformers_loads_identically(tok, hf_tok):
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1, 2)
    assert len(hf_tok) == tok.vocab_size
    assert hf_tok.model_max_length == 512
    for text in UNICODE_SAMPLES + TEXTS[:4]:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.encode(text) == ids
        for skip in (True, False):
            assert hf_tok.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("gen", [True, False])
def test_transformers_chat_template_identical(tok, hf_tok, gen):
    expected = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
    assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen) == expected
    hf_ids = hf_tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert list(hf_ids) == tok.encode(expected)


def test_vocab_too_small():
    minimum = 256 + len(SPECIAL_TOKENS)
    with pytest.raises(TokenizerError, match=f"--vocab-size >= {minimum}"):
        SeekTokenizer.train(texts=TEXTS, vocab_size=minimum - 1)
    assert SeekTokenizer.train(texts=TEXTS[:4], vocab_size=minimum).vocab_size == minimum


def test_no_text():
    with pytest.raises(TokenizerError, match="corpus is empty"):
        SeekTokenizer.train(texts=["", ""], vocab_size=300)
    with pytest.raises(TokenizerError, match="no text"):
        SeekTokenizer.train(vocab_size=300)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        SeekTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match="corrupt"):
        SeekTokenizer.load(tmp_path)
    assert issubclass(TokenizerError, SeekformerError)


def test_train_tokenizer_cli(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n\n".join(TEXTS[:4]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[4:8]) + "\n")
    out = tmp_path / "out"
    tok = train_tokenizer_cli([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], vocab_size=300, out=str(out))
    assert SeekTokenizer.load(out).fingerprint == tok.fingerprint
    with pytest.raises(DataError, match="does not exist"):
        train_tokenizer_cli([str(tmp_path / "missing.txt")], vocab_size=300, out=str(out))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2"):  # raised inside the rust trainer's iterator
        SeekTokenizer.train(files=[tmp_path / "bad.jsonl"], vocab_size=300)


TOOL_MESSAGES = MESSAGES + [
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "4"},
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                            "parameters": {"type": "object", "properties": {
                                                "a": {"type": "number"}, "b": {"type": "number"}}}}}]


@pytest.mark.parametrize("gen", [True, False])
def test_transformers_chat_template_with_tools_identical(tok, hf_tok, gen):
    expected = tok.chat_ids(TOOL_MESSAGES, add_generation_prompt=gen, tools=TOOLS)
    hf_ids = hf_tok.apply_chat_template(TOOL_MESSAGES, tools=TOOLS, tokenize=True, add_generation_prompt=gen,
                                        return_dict=False)
    assert list(hf_ids) == expected
    text = tok.decode(expected, skip_special_tokens=False)
    assert '<|assistant|>{"name": "add", "arguments": {"a": 2, "b": 2}}<|end_of_turn|><|tool|>4' in text


def edited(directory, tmp_path, **changes):
    """A copy of a tokenizer directory whose tokenizer_config.json has `changes` (value DROP: key removed)."""
    import shutil

    d = tmp_path / "edited"
    if not d.exists():
        shutil.copytree(directory, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for k, v in changes.items():
        if v is DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


DROP = object()


def test_the_template_lives_only_in_the_config(tok, saved, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    other = SeekTokenizer.load(edited(saved, tmp_path, chat_template=template))
    assert other.apply_chat_template(MESSAGES[:2]) == "[system] You are terse.\n[user] Héllo 🤖, what is 2+2?\n" \
                                                      "[assistant] "
    assert other.end_of_turn_token_ids == ()
    d = edited(saved, tmp_path, chat_template=DROP)
    with pytest.raises(TokenizerError, match="no chat template: add a \"chat_template\""):
        SeekTokenizer.load(d).chat_ids(MESSAGES)
    (d / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")  # transformers' own file
    assert SeekTokenizer.load(d).apply_chat_template(MESSAGES) == "<|begin_of_text|>You are terse."


def test_template_sandboxed(tok, saved, tmp_path):
    d = edited(saved, tmp_path, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="refused"):
        SeekTokenizer.load(d).apply_chat_template(MESSAGES)
    with pytest.raises(TokenizerError, match="does not compile"):
        SeekTokenizer.load(edited(d, tmp_path, chat_template="{% if %}")).apply_chat_template(MESSAGES)


# ---------------------------------------------------------------------- a DeepSeek-V3-like directory
@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    from tests.deepseek_like import write_tokenizer

    d = tmp_path_factory.mktemp("deepseek")
    write_tokenizer(d, TEXTS)
    return d


def test_deepseek_tokenizer_by_name(deepseek_dir):
    from tests.deepseek_like import BOS, EOS

    tok = SeekTokenizer.load(deepseek_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, EOS)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    assert tok.end_of_turn_token_ids == (1,) and tok.stop_token_ids == (1,)
    assert tok.model_max_length == 131072
    assert (tok.user_token_id, tok.end_of_turn_token_id) == (None, 1)
    assert tok.decode(tok.encode(TEXTS[1], add_bos=True)) == TEXTS[1]


@pytest.mark.parametrize("gen", [True, False])
def test_deepseek_chat_ids_equal_transformers(deepseek_dir, gen):
    transformers = pytest.importorskip("transformers")
    from tests.deepseek_like import LATE_TOKENS

    hf = transformers.AutoTokenizer.from_pretrained(str(deepseek_dir))
    tok = SeekTokenizer.load(deepseek_dir)
    for messages in (MESSAGES, MESSAGES[1:], TOOL_MESSAGES):
        expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert tok.chat_ids(messages, add_generation_prompt=gen) == list(expected)
    assert "<｜tool▁sep｜>add" in tok.decode(tok.chat_ids(TOOL_MESSAGES), skip_special_tokens=False)
    assert hf.encode(TEXTS[2]) == tok.encode(TEXTS[2], add_bos=True)
    assert tok.token_to_id(LATE_TOKENS[3][0]) == hf.convert_tokens_to_ids(LATE_TOKENS[3][0])
    # a re-saved directory (seekformer fine-tune output) still loads the same in both
    out = deepseek_dir.parent / "resaved"
    tok.save(out)
    again = transformers.AutoTokenizer.from_pretrained(str(out))
    assert again.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True, return_dict=False) == \
        SeekTokenizer.load(out).chat_ids(MESSAGES, add_generation_prompt=gen)


def test_config_names_a_token_the_vocabulary_lacks(deepseek_dir, tmp_path):
    with pytest.raises(TokenizerError, match="names eos_token '<|nope|>'"):
        SeekTokenizer.load(edited(deepseek_dir, tmp_path, eos_token="<|nope|>"))
    with pytest.raises(TokenizerError, match="no eos_token"):
        SeekTokenizer.load(edited(deepseek_dir, tmp_path, eos_token=None))
    d = edited(deepseek_dir, tmp_path, eos_token="<|new_eos|>",
               added_tokens_decoder={"700": {"content": "<|new_eos|>", "special": True}})
    assert SeekTokenizer.load(d).eos_token_id == SeekTokenizer.load(d).vocab_size - 1
