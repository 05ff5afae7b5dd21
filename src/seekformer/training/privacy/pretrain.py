"""DP-SGD pretraining: `PrivatePretrainer`, the pretraining `Trainer` with a differentially private step.

`seekformer pretrain RECIPE` with a `privacy:` section (same keys as fine-tuning's, training/privacy/recipe.py).

The privacy unit is one training window: the train split is cut into non-overlapping windows of
`train.seq_len + 1` tokens (data/shards.py `Windows`), and the guarantee covers adding or removing any one
window. A document longer than a window spans several windows, so it is protected only at the group level
(epsilon grows with the number of windows it spans); give short documents, or one document per record,
when a document is the unit you need to protect. Each step:

1. Poisson sampling: every window joins the batch with probability q = train.batch_size / windows;
2. each window's gradient (next-token loss + MTP + balance losses) is computed on its own and clipped to
   `privacy.max_grad_norm` (per_sample.py, exact), the clipped gradients summed;
3. Gaussian noise is added and the sum divided by the expected batch size (mechanism.py); AdamW steps;
4. the aux-loss-free balancing bias updates from the noisy per-window expert-load fractions, charged to
   the same account.

Single process only (no `--nproc`), no `--train.resume`, no gradient accumulation (the Poisson batch is one
step). Validation loss is computed on the validation split as usual (it does not touch the training data).
OUT/privacy.json holds the account; epsilon is logged as it is spent.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ...distributed import env_world_size
from ...errors import RecipeError
from ..trainer import Trainer
from .mechanism import DPSGD
from .per_sample import PerSampleClipper

PRIVACY_FILE = "privacy.json"


class PrivatePretrainer(Trainer):
    """Pretrains with DP-SGD as `recipe.privacy` describes (see the module docstring)."""

    def _validate(self) -> None:
        t = self.t
        if t.resume:
            raise RecipeError("privacy: --train.resume is not supported for DP-SGD runs; start a new train.out")
        if t.grad_accum != 1:
            raise RecipeError("privacy: train.grad_accum must be 1 (the Poisson-sampled batch is one step)")
        if env_world_size() > 1 or self.recipe.parallel.expert_parallel > 1:
            raise RecipeError("privacy: DP-SGD pretraining runs on one process; drop --nproc / torchrun and "
                              "parallel.expert_parallel")
        self.recipe.privacy.validate()
        super()._validate()

    def prepare(self) -> None:
        """The usual preparation, then the records (training windows), the clipper and the noise."""
        from ...data.shards import Windows

        super().prepare()
        t, p = self.t, self.recipe.privacy
        self.windows = Windows(self.shards, "train", t.seq_len + 1)
        moe = [m for name, m in self.model.moe_layers() if not name.startswith("mtp.")]
        balanced = moe if self.model.config.aux_free_bias_update_rate > 0 else []
        self.dp = DPSGD(p, self.windows.count, t.batch_size, t.steps, balanced,
                        self.model.config.num_experts_per_tok, t.seed)
        if self.dp.steps < t.steps:
            self.console.print(f"[yellow]privacy: at noise {p.noise_multiplier:g} the budget epsilon={p.epsilon:g} "
                               f"lasts {self.dp.steps} of {t.steps} steps; training stops there[/]")
            self._shorten(self.dp.steps)
        self.params = [q for g in self.optimizer.param_groups for q in g["params"]]
        self.clipper = PerSampleClipper(self.model, self.params, p.max_grad_norm, self.dp.moe, "loop")
        self.console.print(f"DP-SGD pretraining: {self.windows.count} windows of {t.seq_len + 1} tokens, "
                           f"q={self.dp.q:.4f} (expected batch {t.batch_size}), {t.steps} steps, noise "
                           f"{self.dp.account.noise_multiplier:.3f} (gradients {self.dp.sigma_grad:.3f}"
                           + (f", loads {self.dp.sigma_count:.3f}" if self.dp.sigma_count else "")
                           + f"), C={p.max_grad_norm:g}, {p.accountant}")

    def _shorten(self, steps: int) -> None:
        from ..optim import build_scheduler

        self.t.steps = steps
        self.scheduler = build_scheduler(self.optimizer, self.t.warmup_steps, steps, self.t.min_lr_ratio)

    def train_step(self) -> dict[str, Any]:
        """One DP-SGD step over a Poisson-sampled batch of windows; then the (noisy) balancing update."""
        t = self.t
        picked = self.dp.sample()
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[float] = []
        rec: dict[str, Any] = {"batch": len(picked)}

        def loss_of(one: dict[str, torch.Tensor]) -> torch.Tensor:
            with self.autocast():
                out = self.model(one["input_ids"], labels=one["input_ids"])
            losses.append(float(out.lm_loss.detach()))
            return out.loss

        if picked:
            ids = self.windows.read(np.asarray(picked)).to(t.device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            sums, loads, stats = self.clipper.clipped_sum(batch, loss_of)
            rec.update(stats)
            self.tokens_seen += ids.shape[0] * (ids.shape[1] - 1)
        else:
            sums, loads = [torch.zeros_like(q) for q in self.params], None
        rec["grad_norm"] = self.dp.privatize(self.params, sums, loads)
        layers = self.model.moe_layers()
        for name, moe in layers:  # the (noisy) loads the bias update reads, for the load statistics
            self._interval_counts.setdefault(name, torch.zeros_like(moe.load_counts)).add_(moe.load_counts)
        step = self.step + 1
        rec.update(self.dp.finish_step(self.optimizer, self.scheduler, [m for _, m in layers],
                                       self.model.config.aux_free_bias_update_rate,
                                       log_epsilon=step % t.log_every == 0 or step == t.steps
                                       or self.recipe.privacy.accountant == "rdp"))
        self.step = step
        # the mean training loss of the sampled windows: logged for the curve, not released by the mechanism
        rec["loss"] = sum(losses) / len(losses) if losses else float("nan")
        return rec

    def privacy_report(self) -> dict[str, Any]:
        """OUT/privacy.json: the account, the records and how they were cut."""
        return {**self.dp.report(), "records": self.windows.count, "record": f"window of {self.t.seq_len + 1} tokens",
                "expected_batch_size": self.t.batch_size, "per_sample": "loop"}

    def run(self):
        """Train (Trainer.run), then write OUT/privacy.json."""
        from ...fsio import atomic_write_text

        result = super().run()
        report = self.privacy_report()
        atomic_write_text(self.out / PRIVACY_FILE, json.dumps(report, indent=2) + "\n")
        self.console.print(f"privacy: epsilon {report['epsilon']:.3f} (delta {report['delta']:g}) after "
                           f"{report['steps']} steps -> {self.out}/{PRIVACY_FILE}")
        return result


__all__ = ["PrivatePretrainer", "PRIVACY_FILE"]
