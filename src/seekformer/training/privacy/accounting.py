"""The privacy account of a DP-SGD run, kept by Opacus' accountants (RDP or PRV).

One DP-SGD step releases, for the same Poisson-sampled batch (rate q), two Gaussian sums:
- the clipped per-example gradients (sensitivity C = max_grad_norm), noise std sigma_g * C;
- with MoE balancing, the per-example expert-load fractions (sensitivity S = sqrt(L*K), see dp_sgd.py),
  noise std sigma_c * S.
Rescaling the two blocks by 1/(sigma_g C) and 1/(sigma_c S) turns the pair into one Gaussian mechanism
with unit noise and sensitivity sqrt(sigma_g^-2 + sigma_c^-2); so the step is exactly a subsampled
Gaussian mechanism with the *effective* noise multiplier sigma = (sigma_g^-2 + sigma_c^-2)^-1/2, and that
is what the accountant is charged (docs/privacy.md). `split_noise` picks sigma_g, sigma_c for a share rho
of the cost: sigma_c^-2 = rho sigma^-2, sigma_g^-2 = (1 - rho) sigma^-2.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass


def effective_noise(sigma_grad: float, sigma_count: float | None) -> float:
    """Noise multiplier of the composed (gradient, load-count) Gaussian release of one step."""
    if not sigma_count:
        return sigma_grad
    return (sigma_grad ** -2 + sigma_count ** -2) ** -0.5


def split_noise(sigma: float, share: float) -> tuple[float, float | None]:
    """(sigma_grad, sigma_count) whose composition is `sigma`, `share` of the cost on the counts."""
    if share <= 0:
        return sigma, None
    return sigma / math.sqrt(1 - share), sigma / math.sqrt(share)


def make_accountant(kind: str):
    """A fresh Opacus accountant of `kind` (rdp | prv)."""
    from opacus.accountants import create_accountant

    return create_accountant(kind)


@functools.lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """One step's RDP at Opacus' default orders (its accountant multiplies this by the steps)."""
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    return tuple(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                             orders=RDPAccountant.DEFAULT_ALPHAS))


def epsilon_of(kind: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon that Opacus' accountant `kind` gives for `steps` steps at (noise_multiplier, sample_rate).

    rdp: Opacus' own computation (`compute_rdp` is linear in the steps) with one step's RDP cached, so logging
    epsilon every step costs microseconds instead of a second."""
    if steps <= 0:
        return 0.0
    if kind == "rdp":
        import numpy as np
        from opacus.accountants.analysis.rdp import get_privacy_spent
        from opacus.accountants.rdp import RDPAccountant

        rdp = np.asarray(_rdp_per_step(float(noise_multiplier), float(sample_rate))) * steps
        return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])
    acc = make_accountant(kind)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


def calibrate(kind: str, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 1%) with which `steps` steps at `sample_rate` spend <= epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=kind))


def max_steps(kind: str, epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
              limit: int) -> int:
    """The most steps (<= limit) at (noise_multiplier, sample_rate) whose epsilon stays <= the budget."""
    if epsilon_of(kind, noise_multiplier, sample_rate, limit, delta) <= epsilon:
        return limit
    lo, hi = 0, limit  # eps(lo) <= epsilon < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_of(kind, noise_multiplier, sample_rate, mid, delta) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class PrivacyAccount:
    """The running account: `step()` charges one step; `epsilon` is what Opacus computes for the history."""

    kind: str
    delta: float
    noise_multiplier: float  # effective (composed) sigma charged per step
    sample_rate: float
    steps: int = 0

    def step(self) -> None:
        """Charge one more step at (noise_multiplier, sample_rate)."""
        self.steps += 1

    @property
    def epsilon(self) -> float:
        """Epsilon of the steps charged so far, at this account's delta."""
        return epsilon_of(self.kind, self.noise_multiplier, self.sample_rate, self.steps, self.delta)


__all__ = ["effective_noise", "split_noise", "epsilon_of", "calibrate", "max_steps", "PrivacyAccount",
           "make_accountant"]
