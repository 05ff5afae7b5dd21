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


# ---------------------------------------------------------------------- threads of few-row decoding steps
# A decoding step of a few rows is a chain of small, memory-bound products: a second thread often gains
# nothing and each parallel op pays a hand-off (measured on the 2-vCPU development VM: batch-1 decoding is
# faster on one thread than on two), while prefill and wide batches do gain from every core. The CLI turns
# on "auto": the thread count for steps of at most FEW_ROW_TOKENS tokens is measured once per model (1
# thread vs torch's count, interleaved), other work keeps torch's count. `--threads N` fixes N everywhere.
FEW_ROW_TOKENS = 4
_decode_threads: str | int | None = None  # None: torch's setting everywhere (the library default)


def set_decode_threads(policy: str | int | None) -> None:
    """Threads of few-row decoding steps: "auto" (measured per model), a number, or None (torch's setting)."""
    global _decode_threads
    if policy is not None and policy != "auto" and (not isinstance(policy, int) or policy < 1):
        raise ValueError(f"decode threads must be 'auto', an integer >= 1 or None, got {policy!r}")
    _decode_threads = policy


def decode_threads() -> str | int | None:
    return _decode_threads


class torch_threads:
    """Context manager: torch.set_num_threads(n) inside (n None: unchanged), the previous count restored after."""

    def __init__(self, n: int | None) -> None:
        self.n, self.before = n, None

    def __enter__(self) -> None:
        import torch

        if self.n is not None and self.n != torch.get_num_threads():
            self.before = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if self.before is not None:
            import torch

            torch.set_num_threads(self.before)


def fastest_threads(fn, candidates, repeats: int = 7) -> int:
    """The thread count among `candidates` under which `fn()` runs fastest (median of `repeats` calls, the
    candidates interleaved in each round so a busy machine slows them alike; one warm-up call each)."""
    cands = list(dict.fromkeys(int(c) for c in candidates))
    return fastest({c: (lambda c=c: torch_threads(c)) for c in cands}, fn, repeats)[0]


def fastest(settings: dict, fn, repeats: int = 7) -> tuple:
    """(key, {key: median seconds}) of the setting under which `fn()` runs fastest: `settings` maps a key to a
    function returning a context manager that applies it; the settings interleave in each round (a busy
    machine slows them alike), after one warm-up round."""
    import statistics
    import time

    keys = list(settings)
    if len(keys) == 1:
        return keys[0], {}
    times: dict = {k: [] for k in keys}
    for rnd in range(repeats + 1):
        for k in keys:
            with settings[k]():
                t0 = time.perf_counter()
                fn()
                if rnd:
                    times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return min(keys, key=med.__getitem__), med


# ---------------------------------------------------------------------- the few-row product form
# nn/few_rows.py's W @ X^T form of a decoding step's products: faster than F.linear on some CPUs, slower on
# others. "auto" (the CLI's default) times the model's decoding step both ways once per model and thread
# count and keeps the faster; True/False force it; None (the library default) leaves it on.
_product_form: str | bool | None = None


def set_product_form(policy: str | bool | None) -> None:
    """The few-row product form of decoding steps: "auto" (measured per model), True, False, or None (on)."""
    global _product_form
    if policy not in ("auto", True, False, None):
        raise ValueError(f"few-rows policy must be 'auto', True, False or None, got {policy!r}")
    _product_form = policy


def product_form_policy() -> str | bool | None:
    return _product_form
