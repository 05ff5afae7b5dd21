"""`seekformer compress distill`: train a smaller student on a teacher's output distribution.

Shapes: B sequences, T tokens, V vocabulary, D student hidden size, D_t teacher hidden size.

The student is any seekformer config (a preset, a config.json, or a recipe YAML's `model:` section, with
`key=value` overrides, e.g. fewer layers or experts) with the teacher's vocabulary; it uses the teacher's
tokenizer. Training is the pretraining `Trainer` (same data pipeline, checkpoints, exact resume, logs,
progress bar and plot); `DistillTrainer` only replaces its per-micro-batch loss:

    loss = (1 - W) * CE(student) + W * T^2 * KL(teacher_T || student_T) + H * MSE(P h_student, h_teacher)
           + the student's own MTP and balance terms

with teacher_T / student_T the softmax at temperature T over every position, and P a learned D -> D_t
projection of the final hidden states (only when H > 0; P and its AdamW state are saved in the trainer
state, so a resumed run continues exactly). `W = 0` (and H = 0) is plain next-token training on the
same data, steps and seed: the baseline. The teacher runs in eval mode without gradients.

The same trainer re-trains a pruned model briefly from its unpruned original (`prune --recover-steps`):
the student then starts from given weights (`init_state`) instead of a fresh initialisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..training.trainer import Trainer
from .common import CompressError, check_out, load_with_tokenizer

DISTILL_STATE = "distill"  # key of the distillation state inside the trainer state


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher/T) || softmax(student/T)); logits [..., V] -> scalar."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


class DistillTrainer(Trainer):
    """The pretraining Trainer with a teacher's KL (and optional hidden-state) term in its loss."""

    def __init__(self, recipe, teacher, kd_weight: float = 0.5, temperature: float = 1.0,
                 hidden_weight: float = 0.0, init_state: dict[str, torch.Tensor] | None = None,
                 console=None) -> None:
        if not 0.0 <= kd_weight <= 1.0:
            raise CompressError(f"--kd-weight must be in [0, 1], got {kd_weight}")
        if not temperature > 0:
            raise CompressError(f"--temperature must be > 0, got {temperature}")
        if hidden_weight < 0:
            raise CompressError(f"--hidden-weight must be >= 0, got {hidden_weight}")
        super().__init__(recipe, console=console)
        self.teacher = teacher.eval().requires_grad_(False)
        self.kd_weight, self.temperature, self.hidden_weight = kd_weight, temperature, hidden_weight
        self.needs_hidden = hidden_weight > 0
        self.init_state = init_state
        self.proj: torch.nn.Linear | None = None
        self.proj_optimizer: torch.optim.Optimizer | None = None

    def settings(self) -> dict[str, Any]:
        return {"kd_weight": self.kd_weight, "temperature": self.temperature, "hidden_weight": self.hidden_weight}

    def prepare(self) -> None:
        """The Trainer's prepare, then: the teacher on the device, the vocabularies checked, the student's
        starting weights (`init_state`, fresh runs only) and the hidden-state projection (restored on resume)."""
        super().prepare()
        if self.config.vocab_size != self.teacher.config.vocab_size:
            raise CompressError(f"the student's vocabulary ({self.config.vocab_size}) differs from the teacher's "
                                f"({self.teacher.config.vocab_size}); a student must share the teacher's tokenizer")
        self.teacher.to(self.t.device)
        if self.init_state is not None and self.resumed_from is None:
            self.model.load_state_dict(self.init_state)  # in place: the optimizer keeps its parameters
        if self.hidden_weight > 0:
            torch.manual_seed(self.t.seed + 1)
            self.proj = torch.nn.Linear(self.config.hidden_size, self.teacher.config.hidden_size, bias=False,
                                        device=self.t.device)
            self.proj_optimizer = torch.optim.AdamW(self.proj.parameters(), lr=self.t.lr, weight_decay=0.0)
        if self.resumed_from is not None:
            state = self.checkpoints.load_state(self.resumed_from).get(DISTILL_STATE)
            if state is None or state["settings"] != self.settings():
                raise CompressError(f"{self.resumed_from} was not written by a distillation run with these settings "
                                    f"({self.settings()}); resume with the same options or use a new --out")
            if self.proj is not None:
                self.proj.load_state_dict(state["proj"])
                self.proj_optimizer.load_state_dict(state["proj_optimizer"])

    def loss(self, batch_BT: torch.Tensor, out) -> tuple[torch.Tensor, dict[str, float]]:
        """(1-W)*CE + W*T^2*KL + H*MSE, plus the student's MTP and balance terms (see the module docstring)."""
        with torch.no_grad():
            t_out = self.teacher(batch_BT, return_hidden=self.needs_hidden)
        w, temp = self.kd_weight, self.temperature
        kl = kd_kl(out.logits, t_out.logits, temp)
        loss = out.loss - w * out.lm_loss + w * temp ** 2 * kl
        parts = {"kd_kl": float(kl.detach())}
        if self.proj is not None:
            mse = F.mse_loss(self.proj(out.hidden_states.float()), t_out.hidden_states.float())
            loss = loss + self.hidden_weight * mse
            parts["hidden_mse"] = float(mse.detach())
        return loss, parts

    def train_step(self) -> dict[str, Any]:
        """The Trainer's step; the projection (if any) steps with the student's learning rate."""
        rec = super().train_step()
        if self.proj_optimizer is not None:
            for g in self.proj_optimizer.param_groups:
                g["lr"] = rec["lr"]
            self.proj_optimizer.step()
            self.proj_optimizer.zero_grad(set_to_none=True)
        return rec

    def trainer_state(self) -> dict[str, Any]:
        state = super().trainer_state()
        state[DISTILL_STATE] = {"settings": self.settings()}
        if self.proj is not None:
            state[DISTILL_STATE].update(proj=self.proj.state_dict(), proj_optimizer=self.proj_optimizer.state_dict())
        return state


# ---------------------------------------------------------------------- student recipe
def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['num_hidden_layers=2', ...] -> {'num_hidden_layers': 2} (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for p in pairs:
        if "=" not in p:
            raise CompressError(f"--set {p!r}: use KEY=VALUE, e.g. --set num_hidden_layers=2")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def student_recipe(teacher_dir: Path, student: str, sources: list[str], steps: int, out: Path,
                   overrides: dict[str, Any] | None = None, train: dict[str, Any] | None = None):
    """The student's pretraining Recipe: the teacher's recipe.yaml (data split, seed, batch shape) when it has
    one, the student's `model:` section (a preset name, a config.json, or a recipe YAML's model section, then
    `overrides`), the teacher's tokenizer, `sources`, `steps`, `out`, then `train` overrides."""
    import yaml

    from ..config import PRESETS, SeekConfig
    from ..errors import ConfigError, RecipeError
    from ..training.recipe import recipe_from_dict

    base: dict[str, Any] = {}
    if (teacher_dir / "recipe.yaml").is_file():
        base = yaml.safe_load((teacher_dir / "recipe.yaml").read_text()) or {}
    d: dict[str, Any] = {"data": dict(base.get("data") or {}), "train": dict(base.get("train") or {})}
    p = Path(student)
    if student in PRESETS:
        model: dict[str, Any] = {"preset": student}
    elif p.is_file() and p.suffix == ".json":
        try:
            cfg = SeekConfig.load(p)
        except ConfigError as e:
            raise CompressError(f"--student {p}: {e}") from None
        fields = {f for f in SeekConfig.__dataclass_fields__}
        model = {k: v for k, v in cfg.to_dict().items() if k in fields and k != "quantization_config"}
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            model.pop(k, None)  # the tokenizer's
    elif p.is_file() and p.suffix in (".yaml", ".yml"):
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise CompressError(f"--student {p} is not a recipe (a YAML mapping)")
        model = dict(raw.get("model") or {"preset": "tiny"})
        for sec in ("train", "data"):
            d[sec].update(raw.get(sec) or {})
    else:
        raise CompressError(f"--student {student!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                            "config.json nor a recipe .yaml file")
    model.update(overrides or {})
    d["model"] = model
    d["tokenizer"] = {"path": str(teacher_dir)}
    d["data"]["sources"] = list(sources)
    d["data"]["cache_dir"] = None
    d["train"].update({"out": str(out), "steps": steps, "max_minutes": None, "resume": False,
                       "warmup_steps": min(int(d["train"].get("warmup_steps", 50)), max(1, steps // 10)),
                       "eval_every": max(1, steps // 5), "save_every": max(1, steps // 2),
                       "log_every": max(1, min(10, steps // 20))})
    d["train"].update(train or {})
    try:
        return recipe_from_dict(d)
    except RecipeError as e:
        raise CompressError(f"student recipe: {e}") from None


def distill_dir(teacher_dir: str | os.PathLike, student: str, sources: list[str], steps: int,
                out: str | os.PathLike, kd_weight: float = 0.5, temperature: float = 1.0,
                hidden_weight: float = 0.0, overrides: dict[str, Any] | None = None,
                train: dict[str, Any] | None = None, console=None):
    """Distill the model in `teacher_dir` into a student trained in `out` (a pretraining run directory: the
    model files, checkpoints/, metrics.jsonl, training.png, plus distill.json). Returns the TrainResult."""
    from ..checkpoint import load_config
    from ..fsio import atomic_write_text

    teacher_dir = Path(teacher_dir)
    out = check_out(out, teacher_dir)
    if load_config(teacher_dir).quantization_config:
        raise CompressError(f"{teacher_dir} is quantized; distill from the float model")
    teacher, tok, _ = load_with_tokenizer(teacher_dir)
    if tok is None:
        raise CompressError(f"{teacher_dir} has no tokenizer.json: the student trains on the teacher's tokenizer")
    recipe = student_recipe(teacher_dir, student, sources, steps, out, overrides, train)
    cfg = recipe.model_config(tok.vocab_size)
    if cfg.vocab_size != teacher.config.vocab_size:
        raise CompressError(f"the student's vocabulary ({cfg.vocab_size}) differs from the teacher's "
                            f"({teacher.config.vocab_size}); a student must share the teacher's tokenizer")
    trainer = DistillTrainer(recipe, teacher, kd_weight, temperature, hidden_weight, console=console)
    try:
        trainer.prepare()
        result = trainer.run()
    finally:
        trainer.par.close()
    atomic_write_text(out / "distill.json", json.dumps(
        {"teacher": str(teacher_dir), "student": student, "overrides": overrides or {}, **trainer.settings(),
         "steps": result.steps, "val_losses": result.val_losses}, indent=1) + "\n")
    return result
