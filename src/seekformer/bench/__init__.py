"""Benchmarks that time seekformer against the `transformers` implementation of the same config, in one run.

They are measurements, not tests: `seekformer bench train` (bench/train.py) writes a markdown table to
benchmarks/results/.
"""

from .train import measure_matmul_peak, run_train_bench, train_step_flops

__all__ = ["run_train_bench", "measure_matmul_peak", "train_step_flops"]
