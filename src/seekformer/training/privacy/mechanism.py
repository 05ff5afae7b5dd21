"""The DP-SGD mechanism both private trainers share (fine-tuning: dp_sgd.py, pretraining: pretrain.py).

`DPSGD(privacy, n, expected_batch, planned_steps, ...)` calibrates the noise, then per step:

    picked = dp.sample()                          # Poisson sampling: each record with probability q = B / n
    sums, loads, stats = clipper.clipped_sum(...)  # per-record clipped gradient sums (per_sample.py)
    dp.privatize(params, sums, loads, moe)         # grad = (sum + N(0, (sigma_g C)^2)) / (q n); noisy loads
    optimizer.step(); ...; dp.spend()              # charge the step to the account

MoE balancing under DP: each record's expert-load fractions per MoE layer (counts / tokens: each row sums to
K, so the L2 sensitivity of the [L, E] matrix is sqrt(L K)) are summed and released with Gaussian noise; the
two releases (gradient sum and loads) are charged as one Gaussian mechanism with the composed multiplier
(accounting.split_noise / effective_noise). With `noise_multiplier` given instead of calibrated, `steps` is
the most steps whose epsilon stays within the budget (training stops there).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import RecipeError
from .accounting import PrivacyAccount, calibrate, max_steps, split_noise
from .recipe import PrivacyRecipe


class DPSGD:
    """Noise calibration, Poisson sampling, noisy gradients and loads, and the account of one private run.

    `n`: records (training examples, or pretraining windows); `expected_batch`: B (q = B / n);
    `planned_steps`: the steps the run plans; `moe_layers`: MoE layers whose balancing bias keeps updating
    from noisy loads ([] turns DP balancing off); `top_k`: experts per token (for the load sensitivity).
    """

    def __init__(self, p: PrivacyRecipe, n: int, expected_batch: int, planned_steps: int,
                 moe_layers: list, top_k: int, seed: int) -> None:
        p.validate(n)
        self.p, self.n = p, n
        self.q = expected_batch / n
        if self.q > 1:
            raise RecipeError(f"privacy: the batch size {expected_batch} is more than the {n} records; lower it")
        self.steps = planned_steps
        if p.noise_multiplier is not None:
            sigma = p.noise_multiplier
            if p.epsilon is not None:
                self.steps = max_steps(p.accountant, p.epsilon, p.delta, sigma, self.q, planned_steps)
                if self.steps < 1:
                    raise RecipeError("privacy: the budget does not allow a single step at this noise_multiplier; "
                                      "raise noise_multiplier or epsilon")
        else:
            sigma = calibrate(p.accountant, p.epsilon, p.delta, self.q, planned_steps)
        self.moe = list(moe_layers) if p.balance_share > 0 else []
        self.sigma_grad, self.sigma_count = split_noise(sigma, p.balance_share if self.moe else 0.0)
        self.count_sensitivity = math.sqrt(len(self.moe) * top_k) if self.moe else 0.0
        self.account = PrivacyAccount(p.accountant, p.delta, sigma, self.q)
        self.gen = torch.Generator().manual_seed(seed + 1_000_003)

    @property
    def balance(self) -> bool:
        """Whether the MoE balancing bias keeps updating (from noisy loads)."""
        return bool(self.moe)

    def sample(self) -> list[int]:
        """Indices of this step's batch: each record independently with probability q."""
        return torch.nonzero(torch.rand(self.n, generator=self.gen) < self.q).flatten().tolist()

    def noise_like(self, x: torch.Tensor, std: float) -> torch.Tensor:
        """Gaussian noise N(0, std^2) shaped like `x` (from the run's own generator)."""
        return torch.normal(0.0, std, x.shape, generator=self.gen).to(x.device, x.dtype)

    def privatize(self, params: list[torch.nn.Parameter], sums: list[torch.Tensor],
                  loads: torch.Tensor | None) -> float:
        """Set each parameter's .grad to its noisy clipped sum over the expected batch size q n; put the noisy
        load fractions into the balanced MoE layers' `load_counts`. Returns the noisy gradient's norm."""
        denom = self.q * self.n
        for param, s in zip(params, sums):
            param.grad = (s + self.noise_like(s, self.sigma_grad * self.p.max_grad_norm)) / denom
        if self.moe:
            if loads is None:
                loads = torch.zeros(len(self.moe), self.moe[0].num_experts)
            noisy = loads + self.noise_like(loads, self.sigma_count * self.count_sensitivity)
            for row, m in zip(noisy, self.moe):
                m.load_counts.copy_(row.clamp_min(0))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(q.grad) for q in params])))

    def finish_step(self, optimizer, scheduler, moe_layers, gamma: float, log_epsilon: bool) -> dict[str, Any]:
        """After `privatize`: the optimizer and schedule step, every MoE layer's balancing-bias update (from the
        noisy loads when balancing is on, else the counts are cleared), the step charged to the account.
        Returns {"lr"} (and "epsilon" when `log_epsilon`)."""
        optimizer.step()
        rec: dict[str, Any] = {"lr": scheduler.get_last_lr()[0]}
        scheduler.step()
        for m in moe_layers:
            m.update_bias(gamma if self.balance else 0.0)  # consumes (or clears) the counts
        self.spend()
        if log_epsilon:
            rec["epsilon"] = self.epsilon
        return rec

    def spend(self) -> None:
        """Charge one step to the account."""
        self.account.step()

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (Opacus' accountant for the history)."""
        return self.account.epsilon

    def report(self) -> dict[str, Any]:
        """The account as OUT/privacy.json holds it."""
        p = self.p
        return {"epsilon": self.account.epsilon, "target_epsilon": p.epsilon, "delta": p.delta,
                "noise_multiplier": self.account.noise_multiplier, "grad_noise_multiplier": self.sigma_grad,
                "count_noise_multiplier": self.sigma_count,
                "count_sensitivity": self.count_sensitivity if self.moe else None, "sample_rate": self.q,
                "steps": self.account.steps, "accountant": p.accountant, "max_grad_norm": p.max_grad_norm,
                "moe_balancing": self.balance}


__all__ = ["DPSGD"]
