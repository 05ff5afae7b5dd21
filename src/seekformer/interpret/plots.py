"""PNG figures (matplotlib, Agg): routing heatmaps, attention maps, corpus load histograms, ablation deltas.

Every function writes atomically (temp file + rename) and returns the paths it wrote.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..figures import pyplot, save_figure


def _token_ticks(ax, tokens: list[str], axis: str = "y") -> None:
    n = len(tokens)
    if n > 64:  # too many labels to read: number them instead
        return
    labels = [repr(t)[1:-1][:12] for t in tokens]
    if axis == "y":
        ax.set_yticks(range(n), labels, fontsize=6)
    else:
        ax.set_xticks(range(n), labels, fontsize=6, rotation=90)


def routing_heatmaps(record: dict, out_dir: str | os.PathLike) -> list[Path]:
    """routing_layer{i}.png per MoE layer: tokens x experts, the gate weight of each chosen expert."""
    plt = pyplot()
    tokens, paths = record["tokens"], []
    e = max(1, int(record.get("num_experts") or 0))
    for layer in record["layers"]:
        grid = np.zeros((len(tokens), e), dtype=np.float32)
        for t, (ex, ws) in enumerate(zip(layer["experts"], layer["weights"])):
            grid[t, ex] = ws
        fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * e), min(40, 1.5 + 0.16 * len(tokens))))
        im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("token")
        ax.set_xticks(range(e))
        _token_ticks(ax, tokens)
        ax.set_title(f"layer {layer['layer']}: gate weight per token and expert")
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        paths.append(save_figure(fig, Path(out_dir) / f"routing_layer{layer['layer']}.png"))
    return paths


def attention_maps(tokens: list[str], attention: dict[int, np.ndarray], out_dir: str | os.PathLike) -> list[Path]:
    """Per layer (attention[layer] = probs [H,T,T]): attention_layer{i}_mean.png (head mean) and
    attention_layer{i}_heads.png (one panel per head)."""
    plt = pyplot()
    paths = []
    for layer, probs in sorted(attention.items()):
        h = probs.shape[0]
        fig, ax = plt.subplots(figsize=(7, 6))
        im = ax.imshow(probs.mean(0), cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_xlabel("attended token (key)")
        ax.set_ylabel("token (query)")
        _token_ticks(ax, tokens, "x")
        _token_ticks(ax, tokens, "y")
        ax.set_title(f"layer {layer}: attention, mean of {h} heads")
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        paths.append(save_figure(fig, Path(out_dir) / f"attention_layer{layer}_mean.png"))
        cols = min(4, h)
        rows = math.ceil(h / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for j, ax in enumerate(axes.flat):
            if j < h:
                ax.imshow(probs[j], cmap="viridis", vmin=0, interpolation="nearest")
                ax.set_title(f"head {j}", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"layer {layer}: attention per head")
        fig.tight_layout()
        paths.append(save_figure(fig, Path(out_dir) / f"attention_layer{layer}_heads.png"))
    return paths


def load_histograms(stats: dict[str, dict], out_dir: str | os.PathLike, name: str = "routing_stats.png") -> Path:
    """One panel per MoE layer: each corpus' expert load (bars), with entropy and same-expert rates."""
    plt = pyplot()
    labels = list(stats)
    layers = [x["layer"] for x in stats[labels[0]]["layers"]]
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 2.6 * len(layers)), squeeze=False)
    width = 0.8 / len(labels)
    for ax, layer in zip(axes[:, 0], layers):
        notes = []
        for j, label in enumerate(labels):
            row = next(x for x in stats[label]["layers"] if x["layer"] == layer)
            e = len(row["load"])
            ax.bar(np.arange(e) + j * width - 0.4 + width / 2, row["load"], width, label=label)
            notes.append(f"{label}: H/logE {row['entropy_norm']:.3f}, max/mean {row['max_over_mean']:.2f}, "
                         f"same-expert {row['same_expert_rate']:.3f} (chance {row['same_expert_chance']:.3f})")
        ax.axhline(1.0 / e, color="gray", ls="--", lw=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(e))
        ax.set_ylabel("load")
        ax.text(0.01, 0.97, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=7)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    return save_figure(fig, Path(out_dir) / name)


def ablation_heatmap(report: dict, out_dir: str | os.PathLike, name: str = "ablation.png") -> Path:
    """MoE layers x experts: loss increase when that expert alone is ablated."""
    plt = pyplot()
    grid = np.array([[x["delta"] for x in layer["experts"]] for layer in report["layers"]])
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.5 * grid.shape[1]), 1.5 + 0.5 * grid.shape[0]))
    im = ax.imshow(grid, aspect="auto", cmap="Reds", interpolation="nearest")
    ax.set_yticks(range(grid.shape[0]), [f"layer {x['layer']}" for x in report["layers"]])
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("ablated expert")
    ax.set_title(f"loss increase (baseline {report['baseline_loss']:.3f} nats/token, {report['mode']})")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return save_figure(fig, Path(out_dir) / name)
