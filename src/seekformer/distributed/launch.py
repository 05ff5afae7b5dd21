"""`seekformer pretrain RECIPE --nproc N`: the same command under torch.distributed.run (torchrun).

One machine:   seekformer pretrain RECIPE --nproc 2            (== torchrun --standalone --nproc_per_node 2
                                                                    -m seekformer pretrain RECIPE)
Several:       seekformer pretrain RECIPE --nproc 8 --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT
               on every node (each starts 8 processes; the c10d rendezvous at HOST:PORT joins them).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Callable

from ..errors import RecipeError


def torchrun_command(nproc: int, argv: list[str], nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None, module: str = "seekformer") -> list[str]:
    """The torch.distributed.run command line that starts `python -m module argv` on `nproc` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", module, *argv]


def launch(nproc: int, argv: list[str], nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None) -> int:
    """Run `seekformer argv` on nproc x nnodes processes and wait; returns the launcher's exit code
    (2 when a worker exited 2, i.e. a user mistake it has already reported)."""
    proc = subprocess.run(torchrun_command(nproc, argv, nnodes, node_rank, rdzv_endpoint))
    return proc.returncode


def wants_launch(nproc: int, nnodes: int) -> bool:
    """Whether a CLI verb's --nproc / --nnodes ask for a torchrun launch."""
    return nproc > 1 or nnodes > 1


def relaunch(argv: list[str], nproc: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None,
             check: Callable[[int], None]) -> None:
    """The CLI side of `seekformer VERB RECIPE --nproc N`: check the launch flags and, through `check(world)`,
    that the recipe can run on world = nproc * nnodes processes (one line and exit 2 before any process
    starts), then run `seekformer argv` under torchrun and exit with its code."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise RecipeError("--nproc and --nnodes must be >= 1 and --node-rank in [0, nnodes)")
    if nnodes > 1 and not rdzv_endpoint:
        raise RecipeError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    check(nproc * nnodes)
    raise SystemExit(launch(nproc, argv, nnodes, node_rank, rdzv_endpoint))
