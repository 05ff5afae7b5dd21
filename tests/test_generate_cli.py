"""`seekformer generate` and `seekformer chat` on a tiny random model directory with a real tokenizer."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from seekformer import SeekForCausalLM
from seekformer.cli import main
from seekformer.errors import GenerationError
from seekformer.inference.chat import ChatSession
from seekformer.tokenizer import SeekTokenizer

from .conftest import tiny_config
from .test_inference import MULTIBYTE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen-model")
    tok = SeekTokenizer.train(texts=[MULTIBYTE, "the cat sat on the mat. " * 20], vocab_size=300, min_frequency=1)
    tok.save(d)
    torch.manual_seed(0)
    model = SeekForCausalLM(tiny_config(vocab_size=tok.vocab_size, num_nextn_predict_layers=1,
                                        max_position_embeddings=128))
    model.save_pretrained(d)
    return d


def run(capsys, *args, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_modes_agree(model_dir, capsys):
    base = [str(model_dir), "--prompt", "the cat", "--max-new-tokens", "12"]
    code, greedy, _ = run(capsys, "generate", *base)
    assert code == 0 and greedy.strip()
    code, spec, err = run(capsys, "generate", *base, "--speculative", "--stats")
    assert code == 0 and spec == greedy and "acceptance" in err and "tokens/s" in err
    code, spec3, _ = run(capsys, "generate", *base, "--speculative", "--speculative-tokens", "3")
    assert code == 0 and spec3 == greedy  # drafts past the MTP depth chain the last module: same tokens
    code, naive, _ = run(capsys, "generate", *base, "--cache-mode", "naive")
    assert naive == greedy
    code, beam, _ = run(capsys, "generate", *base, "--num-beams", "3")
    assert code == 0
    samples = [run(capsys, "generate", *base, "--temperature", "0.9", "--top-p", "0.9", "--seed", "4")[1]
               for _ in range(2)]
    assert samples[0] == samples[1]


@pytest.mark.parametrize("args,fragment", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "cat " * 200], "context"),
    (["--prompt", "x", "--cache-mode", "paged"], "cache_mode"),
    (["--prompt", "x", "--dtype", "fp8"], "dtype"),
    (["--prompt", "x", "--top-p", "0"], "top_p"),
    (["--prompt", "x", "--num-beams", "0"], "num-beams"),
])
def test_generate_user_errors(model_dir, capsys, args, fragment):
    code, _, err = run(capsys, "generate", str(model_dir), *args)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_generate_missing_model_dir(tmp_path, capsys):
    code, _, err = run(capsys, "generate", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and "does not exist" in err


def test_chat_reset_and_exit(model_dir, capsys, monkeypatch):
    code, out, _ = run(capsys, "chat", str(model_dir), "--max-new-tokens", "8", "--temperature", "0",
                       stdin="hello\n/reset\nhello\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert code == 0
    lines = out.splitlines()
    assert "(conversation cleared)" in lines
    i = lines.index("(conversation cleared)")
    assert lines[:i] == lines[i + 1:]  # same greedy reply after /reset


def test_chat_session_history_and_trimming(model_dir):
    model = SeekForCausalLM.from_pretrained(model_dir).eval()
    tok = SeekTokenizer.load(model_dir)
    s = ChatSession(model, tok, system="be brief", max_new_tokens=16, temperature=0)
    for _ in range(6):  # 128-token context: old turns must be dropped
        "".join(s.send("the cat sat on the mat " * 3))
    assert [m["role"] for m in s.messages][:2] == ["system", "user"] and s.messages[-1]["role"] == "assistant"
    assert len(s.messages) < 13
    assert len(tok.encode(tok.apply_chat_template(s.messages[:-1]))) + 16 <= 128
    with pytest.raises(GenerationError):
        "".join(s.send("cat " * 150))
    assert s.messages[-1]["role"] == "assistant"  # the message that did not fit was not kept
