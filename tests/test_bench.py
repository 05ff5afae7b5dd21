"""`seekformer bench train`: a smoke run (the benchmark itself is a measurement, not a test)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from seekformer.bench.train import run_train_bench, train_step_flops  # noqa: E402
from seekformer.config import SeekConfig  # noqa: E402


def test_train_bench_smoke(tmp_path):
    out = tmp_path / "train.md"
    rows = run_train_bench(presets=("tiny",), dtypes=("fp32",), batch_size=1, seq_len=8, steps=1, threads=1,
                           out_md=out, log=lambda _: None)
    (row,) = rows
    assert row["preset"] == "tiny" and row["dtype"] == "fp32"
    assert row["sf_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["peak_gflops"] > 0
    assert row["first_loss_diff"] < 1e-4  # the two models really start from the same weights
    assert row["hf_experts_implementation"] == "grouped_mm" and row["hf_attn_implementation"] == "sdpa"
    text = out.read_text()
    assert "| tiny | fp32 |" in text and "speedup" in text


def test_flops_grow_with_tokens_and_attention():
    cfg = SeekConfig.from_preset("tiny")
    assert train_step_flops(cfg, 2, 64) == pytest.approx(2 * train_step_flops(cfg, 1, 64))
    assert train_step_flops(cfg, 1, 128) > 2 * train_step_flops(cfg, 1, 64)  # attention is quadratic


def test_bench_cli_rejects_unknown_preset():
    proc = subprocess.run([sys.executable, "-m", "seekformer", "bench", "train", "--preset", "huge"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "unknown preset 'huge'" in proc.stderr and "Traceback" not in proc.stderr


def test_report_writer(tmp_path):
    """bench/report.py, the one writer of benchmarks/results/*.md: header, tables, atomic write."""
    from seekformer.bench.report import Machine, header, table, write_report

    lines = header("T", "seekformer bench x --y 1", Machine(threads=1))
    assert lines[0] == "# T" and "`seekformer bench x --y 1`" in lines[2] and "1 thread(s)" in lines[4]
    rows = table(["name", "tok/s"], [["a|b", "1.0"], ["c", None]])
    assert rows == ["| name | tok/s |", "|---|---:|", "| a\\|b | 1.0 |", "| c | - |"]
    with pytest.raises(ValueError):
        table(["a", "b"], [["only one"]])
    out = write_report(tmp_path / "r" / "x.md", lines + rows)
    assert out.read_text().endswith("| c | - |\n") and list(out.parent.iterdir()) == [out]
