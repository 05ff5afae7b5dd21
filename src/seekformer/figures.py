"""PNG figures: the one place that sets up matplotlib (headless Agg backend) and writes figures atomically.

    plt = pyplot()
    fig, ax = plt.subplots()
    ...
    save_figure(fig, out / "training.png")    # temp file + rename: a reader never sees half a PNG

matplotlib is imported on first use only (it is in the base dependencies but slow to import).
"""

from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `fig` to `path` (PNG) atomically, close it, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path
