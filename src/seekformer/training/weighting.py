"""Multi-task loss weighting and gradient surgery.

Every step the fine-tuning loop asks the strategy for the weights w_i of the tasks in the step, back-
propagates w_i * L_i task by task (keeping each task's gradient g_i on the shared trunk parameters),
combines the g_i (a plain sum, or PCGrad), and finally calls `update(losses, shared_grad_norms)`.

* fixed        w_i from the recipe (`weight:` of each task).
* uncertainty  Kendall, Gal & Cipolla 2018: L = sum_i exp(-s_i) L_i + s_i, with s_i = log sigma_i^2
               learned (so w_i = exp(-s_i)); s_i starts at 0 (w = 1).
* gradnorm     Chen et al. 2018: w_i learned so that the gradient norms G_i = w_i ||grad_W L_i|| on the last
               shared layer W approach mean(G) * r_i^alpha, r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0));
               the weights are renormalised to sum to the number of tasks after every update.
* dwa          Liu, Johns & Davison 2019 (Dynamic Weight Average): w_i = K softmax_i(r_i / T),
               r_i = Lbar_i(k-1) / Lbar_i(k-2) over windows ("epochs") of `window` steps; 1 for the first two.
* pcgrad       Yu et al. 2020 (optional with any strategy): when g_i . g_j < 0, g_i -= (g_i.g_j / |g_j|^2) g_j,
               over the other tasks in random order, before summing.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from ..errors import RecipeError

STRATEGIES = ("fixed", "uncertainty", "gradnorm", "dwa")


class Weighting(nn.Module):
    """Base: fixed weights. `weights()` -> {task: w}; `update(...)` after each step; `state()` for logs."""

    needs_layer_grad_norms = False

    def __init__(self, tasks: list[str], init: dict[str, float] | None = None) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.init = {t: float((init or {}).get(t, 1.0)) for t in self.tasks}

    def weights(self) -> dict[str, float]:
        """{task: loss weight} for the next step."""
        return dict(self.init)

    def update(self, losses: dict[str, float], layer_grad_norms: dict[str, float] | None = None) -> None:
        """Called after each optimizer step with the step's unweighted task losses and, when
        `needs_layer_grad_norms`, ||grad_W L_i|| on the last shared layer (unweighted)."""

    def state(self) -> dict[str, float]:
        """Log values of the strategy ({'weight/TASK': w, ...})."""
        return {f"weight/{t}": w for t, w in self.weights().items()}

    # ------------------------------------------------------------ resume
    def checkpoint_state(self) -> dict:
        """Everything `update` has learned or accumulated (parameters, their Adam state, histories)."""
        out: dict = {"params": self.state_dict()}
        opt = getattr(self, "opt", None)
        if opt is not None:
            out["opt"] = opt.state_dict()
        out.update(self._extra_state())
        return out

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore what `checkpoint_state` returned (exact resume)."""
        self.load_state_dict(state["params"])
        opt = getattr(self, "opt", None)
        if opt is not None:
            opt.load_state_dict(state["opt"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass


class UncertaintyWeighting(Weighting):
    """Learned homoscedastic uncertainty s_i = log sigma_i^2 (Kendall et al. 2018), in the common form
    L = sum_i exp(-s_i) L_i + s_i (w_i = exp(-s_i), optimum s_i = log L_i); s_i trained by Adam at `lr`."""

    def __init__(self, tasks: list[str], init: dict[str, float] | None = None, lr: float = 0.025) -> None:
        super().__init__(tasks, init)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))
        self.opt = torch.optim.Adam([self.log_vars], lr=lr)

    def weights(self) -> dict[str, float]:
        """w_i = exp(-log_var_i) times the task's initial weight (Kendall et al.): noisier tasks weigh less."""
        w = torch.exp(-self.log_vars.detach())
        return {t: float(w[i]) * self.init[t] for i, t in enumerate(self.tasks)}

    def update(self, losses: dict[str, float], layer_grad_norms: dict[str, float] | None = None) -> None:
        """One Adam step on the log-variances from this step's task losses."""
        idx = torch.tensor([self.tasks.index(t) for t in losses])
        l = torch.tensor([float(v) for v in losses.values()])
        s = self.log_vars[idx]
        loss = (torch.exp(-s) * l + s).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def state(self) -> dict[str, float]:
        """Log values: weights and log-variances per task."""
        out = super().state()
        out.update({f"log_var/{t}": float(self.log_vars[i].detach()) for i, t in enumerate(self.tasks)})
        return out


class GradNormWeighting(Weighting):
    """GradNorm (Chen et al. 2018) with asymmetry `alpha`; weights learned by Adam at `lr`."""

    needs_layer_grad_norms = True

    def __init__(self, tasks: list[str], init: dict[str, float] | None = None, alpha: float = 1.5,
                 lr: float = 0.025) -> None:
        super().__init__(tasks, init)
        w0 = torch.tensor([self.init[t] for t in self.tasks])
        self.w = nn.Parameter(w0 * len(self.tasks) / w0.sum())
        self.alpha = alpha
        self.opt = torch.optim.Adam([self.w], lr=lr)
        self.initial_loss: dict[str, float] = {}

    def weights(self) -> dict[str, float]:
        """The current GradNorm weights (they sum to the number of tasks)."""
        return {t: float(self.w[i].detach()) for i, t in enumerate(self.tasks)}

    def update(self, losses: dict[str, float], layer_grad_norms: dict[str, float] | None = None) -> None:
        """Move the weights so that each task's gradient norm on the last shared layer tracks its relative training
        rate (Chen et al. 2018)."""
        for t, l in losses.items():
            self.initial_loss.setdefault(t, max(float(l), 1e-8))
        present = [t for t in losses if layer_grad_norms and t in layer_grad_norms]
        if len(present) < 2:
            return
        idx = torch.tensor([self.tasks.index(t) for t in present])
        norms = torch.tensor([layer_grad_norms[t] for t in present])  # ||grad_W L_i||, unweighted
        ratio = torch.tensor([losses[t] / self.initial_loss[t] for t in present])
        target = ratio / ratio.mean()
        g = self.w[idx] * norms  # G_i = w_i ||grad_W L_i||
        goal = (g.mean() * target.pow(self.alpha)).detach()
        loss = (g - goal).abs().sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.w.clamp_(min=1e-3)
            self.w.mul_(len(self.tasks) / self.w.sum())

    def _extra_state(self) -> dict:
        return {"initial_loss": dict(self.initial_loss)}

    def _load_extra_state(self, state: dict) -> None:
        self.initial_loss = dict(state["initial_loss"])

class DWAWeighting(Weighting):
    """Dynamic Weight Average (Liu et al. 2019) over windows of `window` steps, temperature `temperature`."""

    def __init__(self, tasks: list[str], init: dict[str, float] | None = None, temperature: float = 2.0,
                 window: int = 20) -> None:
        super().__init__(tasks, init)
        self.temperature, self.window = temperature, max(1, window)
        self.history: list[dict[str, float]] = []  # mean loss per task of each finished window
        self.current: dict[str, list[float]] = {t: [] for t in self.tasks}
        self.steps = 0
        self._w = {t: 1.0 for t in self.tasks}

    def weights(self) -> dict[str, float]:
        """The Dynamic Weight Average weights of the current window."""
        return {t: self._w[t] * self.init[t] for t in self.tasks}

    def update(self, losses: dict[str, float], layer_grad_norms: dict[str, float] | None = None) -> None:
        """Accumulate the window's losses; at a window's end, recompute weights from the ratio of the last two windows'
        mean losses."""
        for t, l in losses.items():
            self.current[t].append(float(l))
        self.steps += 1
        if self.steps % self.window:
            return
        prev = self.history[-1] if self.history else {}
        self.history.append({t: (sum(v) / len(v) if v else prev.get(t, math.nan)) for t, v in self.current.items()})
        self.current = {t: [] for t in self.tasks}
        if len(self.history) < 2:
            return
        a, b = self.history[-1], self.history[-2]
        r = torch.tensor([a[t] / b[t] if b[t] > 0 and math.isfinite(a[t] / b[t]) else 1.0 for t in self.tasks])
        w = len(self.tasks) * torch.softmax(r / self.temperature, dim=0)
        self._w = {t: float(w[i]) for i, t in enumerate(self.tasks)}

    def _extra_state(self) -> dict:
        return {"history": [dict(h) for h in self.history], "current": {t: list(v) for t, v in self.current.items()},
                "steps": self.steps, "w": dict(self._w)}

    def _load_extra_state(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.current = {t: list(v) for t, v in state["current"].items()}
        self.steps, self._w = int(state["steps"]), dict(state["w"])


def build_weighting(strategy: str, tasks: list[str], init: dict[str, float] | None = None, *,
                    alpha: float = 1.5, lr: float = 0.025, temperature: float = 2.0, window: int = 20) -> Weighting:
    """The weighting strategy `name` (fixed | uncertainty | gradnorm | dwa) for `tasks` with initial weights and its
    settings."""
    if strategy == "fixed":
        return Weighting(tasks, init)
    if strategy == "uncertainty":
        return UncertaintyWeighting(tasks, init, lr=lr)
    if strategy == "gradnorm":
        return GradNormWeighting(tasks, init, alpha=alpha, lr=lr)
    if strategy == "dwa":
        return DWAWeighting(tasks, init, temperature=temperature, window=window)
    raise RecipeError(f"unknown weighting.strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def pcgrad(grads: dict[str, torch.Tensor], seed: int | None = None) -> tuple[torch.Tensor, int]:
    """PCGrad (Yu et al. 2020) on flat per-task gradients {task: [P]} -> (combined [P], number of projections)."""
    names = list(grads)
    rng = random.Random(seed)
    out, conflicts = [], 0
    for i in names:
        g = grads[i].clone()
        others = [j for j in names if j != i]
        rng.shuffle(others)
        for j in others:
            gj = grads[j]
            dot = torch.dot(g, gj)
            if dot < 0:
                g -= dot / gj.dot(gj).clamp_min(1e-20) * gj
                conflicts += 1
        out.append(g)
    return torch.stack(out).sum(0), conflicts


def sampling_probs(sizes: dict[str, int], mode: str, temperature: float = 1.0) -> dict[str, float]:
    """Task sampling probabilities: proportional (p ~ n), temperature (p ~ n^(1/T)), uniform."""
    if mode == "uniform":
        return {t: 1.0 / len(sizes) for t in sizes}
    if mode == "proportional":
        temperature = 1.0
    elif mode != "temperature":
        raise RecipeError(f"unknown train.sampling {mode!r}; choose all, proportional, temperature or uniform")
    if temperature <= 0:
        raise RecipeError(f"train.temperature must be > 0, got {temperature}")
    raw = {t: n ** (1.0 / temperature) for t, n in sizes.items()}
    z = sum(raw.values())
    return {t: v / z for t, v in raw.items()}


__all__ = ["STRATEGIES", "Weighting", "UncertaintyWeighting", "GradNormWeighting", "DWAWeighting",
           "build_weighting", "pcgrad", "sampling_probs"]
