"""Process-level performance settings for CPU training, serving and benchmarks.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and gives
it back on free, so each large temporary of a training step (logits, softmax, their gradients) is paid in
page faults again at every step: on a small VM that costs as much as the arithmetic on those tensors.
`tune_malloc()` raises the mmap and trim thresholds so freed memory is kept and reused (what jemalloc or
tcmalloc, the usual advice for PyTorch on CPU, also achieve). It changes nothing but speed.

The OpenMP wait policy (`default_openmp_spin`, `prefer_passive_openmp`) is set by the CLI at start-up;
importing seekformer changes nothing in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep freed heap memory up to `threshold` bytes for reuse (glibc only); returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1 and ok
    return ok


# Set (to "1") when seekformer, not the user, chose the OpenMP wait policy: then `serve` may change it.
OPENMP_MARKER = "SEEKFORMER_OPENMP_DEFAULTED"


def default_openmp_spin(spincount: int = 1000) -> bool:
    """At CLI start-up (never on `import seekformer`): how long idle OpenMP threads spin before they sleep.

    libgomp's default (300k spins, ~ms) collapses throughput when another process competes for the cores
    (a 2-thread training step ran 10x slower); never spinning (OMP_WAIT_POLICY=PASSIVE) pays a thread
    wake-up for every parallel op instead (~25% of a training step and ~30% of a small model's decoding step
    on an idle 2-core VM). A short spin keeps most of both. Only before torch (and its OpenMP runtime)
    loads, and only when the user set neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT. Returns whether it applied.
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(spincount)
    os.environ[OPENMP_MARKER] = "1"
    return True


def prefer_passive_openmp() -> bool:
    """Let idle OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE) instead of the CLI's short spin; for the
    server, whose HTTP event-loop thread needs the cores between decoding steps (measured: a single client
    got ~15% more tokens/s). Only before torch loads, and only when seekformer (`default_openmp_spin`) chose
    the policy, not the user. Returns whether it applied."""
    if "torch" in sys.modules or os.environ.get(OPENMP_MARKER) != "1":
        return False
    os.environ.pop("GOMP_SPINCOUNT", None)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def loadavg() -> float | None:
    """The 1-minute load average, or None where the OS has none (benchmarks print it: other processes
    skew timings)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
