"""User mistakes on the command line: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seekformer", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture
def recipe_file(tmp_path, small_text) -> Path:
    corpus = tmp_path / "c.txt"
    corpus.write_text(small_text)
    p = tmp_path / "r.yaml"
    p.write_text(f"""
model: {{preset: tiny, hidden_size: 32, intermediate_size: 64, moe_intermediate_size: 16, num_hidden_layers: 2,
        num_attention_heads: 2, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 8, v_head_dim: 8}}
tokenizer: {{vocab_size: 300}}
data: {{sources: ["{corpus}"]}}
train: {{out: "{tmp_path / 'out'}", steps: 2, seq_len: 16, batch_size: 2, eval_every: 2, eval_batches: 1,
        save_every: 2, progress: false}}
""")
    return p


def test_unknown_recipe_key(recipe_file):
    assert_user_error(run_cli("pretrain", str(recipe_file), "--train.learning_rate", "1"),
                      "unknown recipe key 'train.learning_rate'")


def test_wrong_value_type(recipe_file):
    assert_user_error(run_cli("pretrain", str(recipe_file), "--train.steps", "many"), "train.steps expects an integer")


def test_missing_data_path(recipe_file, tmp_path):
    assert_user_error(run_cli("pretrain", str(recipe_file), "--data.sources", str(tmp_path / "nope.txt")),
                      "does not exist")


def test_empty_corpus(recipe_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert_user_error(run_cli("pretrain", str(recipe_file), "--data.sources", str(empty)), "empty")


def test_vocabulary_too_small(recipe_file):
    assert_user_error(run_cli("pretrain", str(recipe_file), "--tokenizer.vocab_size", "100"), "vocab")


def test_tokenizer_train_missing_file(tmp_path):
    assert_user_error(run_cli("tokenizer", "train", str(tmp_path / "x.txt"), "--out", str(tmp_path / "t")),
                      "does not exist")


def test_pretrain_resume_and_mismatch(recipe_file):
    ok = run_cli("pretrain", str(recipe_file))
    assert ok.returncode == 0, ok.stderr
    assert_user_error(run_cli("pretrain", str(recipe_file), "--resume", "--model.hidden_size", "64"),
                      "does not match")


def test_generate_missing_truncated_and_corrupt_model_dir(tmp_path, recipe_file):
    assert_user_error(run_cli("generate", str(tmp_path / "nope"), "--prompt", "hi"), "does not exist")
    ok = run_cli("pretrain", str(recipe_file))
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "out"
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_user_error(run_cli("generate", str(out), "--prompt", "hi"), "truncated or corrupt")
    (out / "config.json").write_text("{")
    assert_user_error(run_cli("generate", str(out), "--prompt", "hi"), "config.json")
