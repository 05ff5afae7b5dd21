"""Training logs: a JSONL metrics file, TensorBoard event files, and a PNG plot of the curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"


class MetricsLogger:
    """Appends one JSON object per record to OUT/metrics.jsonl and mirrors scalars to TensorBoard.

    On resume from step S, records after S (written by the interrupted run) are dropped first, so the
    file reads like one uninterrupted run.
    """

    def __init__(self, out_dir: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / METRICS_FILE
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in kept))
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_step)
            except Exception:  # noqa: BLE001 - TensorBoard is a convenience; never fail training for it
                self._tb = None

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Append `{step, **record}` to metrics.jsonl and its finite scalars to TensorBoard."""
        rec = {"step": step, **record}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Close the metrics file and the TensorBoard writer."""
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (or of OUT/metrics.jsonl for a directory), in order."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_training(out_dir: str | os.PathLike, records: list[dict[str, Any]] | None = None) -> Path:
    """Write OUT/training.png: train/validation loss, max/mean expert load per MoE layer, final load map."""
    from ..figures import pyplot, save_figure

    plt = pyplot()

    out = Path(out_dir)
    records = records if records is not None else read_metrics(out)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    load_keys = sorted({k for r in records for k in r if k.startswith("load_max_over_mean/")})
    fractions = next((r["load_fractions"] for r in reversed(records) if "load_fractions" in r), None)
    ncols = 3 if fractions else (2 if load_keys else 1)
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if load_keys:
        ax = axes[0][1]
        for k in load_keys:
            pts = [(r["step"], r[k]) for r in records if k in r]
            ax.plot(*zip(*pts), label=k.split("/", 1)[1], lw=1)
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("max / mean tokens per expert")
        ax.set_title("expert load balance (1 = perfect)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if fractions:
        ax = axes[0][2]
        names = list(fractions)
        im = ax.imshow([fractions[n] for n in names], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title("fraction of routed tokens per expert (last log)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_figure(fig, out / PLOT_FILE, dpi=110)
