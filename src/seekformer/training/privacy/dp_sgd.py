"""DP-SGD fine-tuning: `PrivateTrainer`, a MultiTaskTrainer whose step is a differentially private one.

One step (Abadi et al. 2016, with Poisson sampling as the accountants assume):
1. every training example joins the batch independently with probability q = batch_size / n;
2. per-example gradients g_i (per_sample.py) are clipped to L2 norm C = max_grad_norm and summed;
3. Gaussian noise N(0, (sigma_g C)^2) is added and the sum divided by the expected batch size q n;
4. AdamW (and the schedule) step on that gradient;
5. MoE balancing under DP (full fine-tuning): each example's expert-load fractions per MoE layer
   (counts / tokens: row sums K, entries <= 1, so ||.||_2 <= sqrt(L K) for L MoE layers) are summed,
   N(0, (sigma_c sqrt(L K))^2) is added, and the aux-loss-free bias update b += gamma sign(mean - load)
   reads the noisy loads. Both releases are charged to one account as one Gaussian mechanism with the
   composed noise multiplier (accounting.py, docs/privacy.md).
The noise multiplier is calibrated (Opacus' get_noise_multiplier) so that the planned `train.steps`
reach `privacy.epsilon`; when `noise_multiplier` is given instead, the run stops at the last step whose
epsilon stays within the budget. Epsilon is logged as it is spent; OUT/privacy.json holds the account.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import RecipeError
from ..multitask import MultiTaskTrainer
from .accounting import epsilon_of
from .recipe import DP_TRAIN_DEFAULTS
from .mechanism import DPSGD
from .per_sample import PerSampleClipper

PRIVACY_FILE = "privacy.json"


class PrivateTrainer(MultiTaskTrainer):
    """Fine-tunes one task with DP-SGD as `recipe.privacy` describes (see the module docstring)."""

    def prepare(self) -> None:
        """The usual preparation, then the noise (mechanism.py), the per-example clipper and the sampler."""
        from ...data.tasks import collate

        super().prepare()
        p, t = self.recipe.privacy, self.t
        if t.resume:
            raise RecipeError("privacy: --train.resume is not supported for DP-SGD runs yet; start a new out")
        (self.task,) = self.names
        data = self.data[self.task]
        self.examples = data.train
        n = len(self.examples)
        if "batch_size" in getattr(self.recipe, "dp_defaulted", ()) and t.batch_size > n // 2:
            # the default expected batch suits ~1,000+ examples; smaller data keeps q <= 1/2
            t.batch_size = max(1, n // 2)
            self.console.print(f"privacy: expected batch {t.batch_size} (half of the {n} examples; the default "
                               f"{DP_TRAIN_DEFAULTS['batch_size']} is for larger data)")
        gamma = self.model.config.aux_free_bias_update_rate
        moe = [m for n_, m in self.model.lm.moe_layers() if not n_.startswith("mtp.")]
        balanced = moe if t.method == "full" and gamma > 0 else []
        self.dp = DPSGD(p, n, t.batch_size, t.steps, balanced, self.model.config.num_experts_per_tok, t.seed)
        if self.dp.steps < t.steps:
            self.console.print(f"[yellow]privacy: at noise {p.noise_multiplier:g} the budget epsilon={p.epsilon:g} "
                               f"lasts {self.dp.steps} of {t.steps} steps; training stops there[/]")
            self._shorten(self.dp.steps)
        self.balance, self.moe = self.dp.balance, self.dp.moe
        self.params = [q for g in self.optimizer.param_groups for q in g["params"]]
        strategy = p.per_sample
        if strategy == "auto" and data.decl["type"] != "classification":
            strategy = "loop"
        if strategy in ("vmap", "hooks") and data.decl["type"] != "classification":
            raise RecipeError(f"privacy.per_sample {strategy} supports classification tasks; use per_sample: loop")
        # hooks needs B * (batch loss) = the sum of the examples' losses: the router z-loss (a token mean over
        # the whole batch) breaks that
        sums = self.model.config.router_z_loss_coef == 0
        self.features = None
        if t.method == "frozen" and data.decl["type"] == "classification":
            # frozen trunk: pooled trunk features are fixed, computed once; per-example gradients of the head
            head = self.model.heads[self.task]
            self.features = self._pooled_features(head)
            self.clipper = PerSampleClipper(head, self.params, p.max_grad_norm, [], "vmap", self._head_loss)
        else:
            if strategy == "hooks" and not sums:
                raise RecipeError("privacy.per_sample hooks needs model.router_z_loss_coef 0 (the z-loss couples "
                                  "the examples of a batch); use per_sample: loop")
            self.clipper = PerSampleClipper(self.model, self.params, p.max_grad_norm, self.moe, strategy,
                                            self._vmap_loss, loss_sums_examples=sums)
        self._collate = lambda ex: collate(ex, data.decl["type"], self.tokenizer.pad_token_id)
        dp = self.dp
        self.console.print(f"DP-SGD: n={n}, q={dp.q:.4f} (expected batch {t.batch_size}), {t.steps} steps, "
                           f"noise {dp.account.noise_multiplier:.3f} (gradients {dp.sigma_grad:.3f}"
                           + (f", loads {dp.sigma_count:.3f}" if dp.sigma_count else "")
                           + f"), C={p.max_grad_norm:g}, {p.accountant}, per-sample {strategy}")

    def _shorten(self, steps: int) -> None:
        from ..optim import build_scheduler

        self.t.steps = steps
        self.scheduler = build_scheduler(self.optimizer, self.t.warmup_steps, steps, self.t.min_lr_ratio)

    # ------------------------------------------------------------------ losses
    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(self.task, **batch)
        loss = self.weighting.weights()[self.task] * out.loss
        return loss + out.aux_loss if out.aux_loss is not None else loss

    def _vmap_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Classification loss of one right-padded example [1,T] without data-dependent control flow: the
        trunk runs unmasked (causal attention never reads the right padding from a real token), the head
        pools with the mask."""
        hidden = self.model.trunk_states(self.task, batch["input_ids"], None)
        aux = self.model._aux_loss()
        logits = self.model.heads[self.task](hidden, batch["attention_mask"], batch["input_ids"])
        loss = self.weighting.weights()[self.task] * F.cross_entropy(logits.float(), batch["labels"])
        return loss + aux if aux is not None else loss

    @torch.no_grad()
    def _pooled_features(self, head) -> torch.Tensor:
        """The frozen trunk's pooled features of every training example [n,D] (eval mode, batched)."""
        from ...data.tasks import eval_batches

        self.model.eval()
        feats = []
        for _, batch in eval_batches(self.examples, "classification", self.t.eval_batch_size,
                                     self.tokenizer.pad_token_id):
            ids, mask = batch["input_ids"].to(self.t.device), batch["attention_mask"].to(self.t.device)
            feats.append(head.pool(self.model.trunk_states(self.task, ids, mask), mask, ids))
        self.model.train()
        return torch.cat(feats)

    def _head_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Frozen-trunk classification loss from pooled features [1,D] (vmappable)."""
        logits = self.model.heads[self.task].classify(batch["features"])
        return self.weighting.weights()[self.task] * F.cross_entropy(logits.float(), batch["labels"])

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """One DP-SGD step over a Poisson-sampled batch (mechanism.py); then the (noisy) balancing update."""
        picked = self.dp.sample()
        self.optimizer.zero_grad(set_to_none=True)
        rec: dict[str, Any] = {"batch": len(picked)}
        if picked:
            batch = {k: v.to(self.t.device) for k, v in self._collate([self.examples[i] for i in picked]).items()}
            if self.features is not None:
                batch = {"features": self.features[picked], "labels": batch["labels"]}
            sums, loads, stats = self.clipper.clipped_sum(batch, self._loss)
            with torch.no_grad():
                rec[f"loss/{self.task}"] = float(self._batch_loss(batch))
            rec.update(stats)
        else:
            sums, loads = [torch.zeros_like(q) for q in self.params], None
        rec["grad_norm"] = self.dp.privatize(self.params, sums, loads)
        step, t = self.step + 1, self.t
        rec.update(self.dp.finish_step(self.optimizer, self.scheduler, [m for _, m in self.model.lm.moe_layers()],
                                       self.model.config.aux_free_bias_update_rate,
                                       log_epsilon=step % t.log_every == 0 or step == t.steps
                                       or self.recipe.privacy.accountant == "rdp"))
        self.step = step
        rec["loss"] = rec.get(f"loss/{self.task}", float("nan"))
        return rec

    @torch.no_grad()
    def _batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (non-private, logged only) mean task loss of the sampled batch, in eval mode."""
        self.model.eval()
        try:
            if "features" in batch:
                return F.cross_entropy(self.model.heads[self.task].classify(batch["features"]).float(),
                                       batch["labels"])
            return self.model(self.task, **batch).loss
        finally:
            self.model.train()

    # ------------------------------------------------------------------ output
    def privacy_report(self) -> dict[str, Any]:
        """OUT/privacy.json: the account (mechanism.py) and how the per-example gradients were computed."""
        return {**self.dp.report(), "expected_batch_size": self.t.batch_size, "examples": len(self.examples),
                "method": self.t.method, "per_sample": self.clipper.strategy,
                "per_sample_fallback": self.clipper.fallback_reason}

    def extra_output_files(self) -> dict[str, str]:
        """Files written next to the model: privacy.json."""
        return {PRIVACY_FILE: json.dumps(self.privacy_report(), indent=2) + "\n"}

    def run(self):
        """Fine-tune (MultiTaskTrainer.run), then report the epsilon spent."""
        result = super().run()
        r = self.privacy_report()
        self.console.print(f"privacy: epsilon {r['epsilon']:.3f} (delta {r['delta']:g}) after {r['steps']} steps "
                           f"-> {result.out_dir}/{PRIVACY_FILE}")
        return result


__all__ = ["PrivateTrainer", "PRIVACY_FILE", "epsilon_of"]
