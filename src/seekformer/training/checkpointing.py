"""Checkpoints and resume for every training loop (pretraining, multi-task fine-tuning, and what builds on them).

    OUT/checkpoints/step-000500/   one complete checkpoint: what the trainer writes (model files, ...),
                                   trainer_state/state.pt (optimizer, scheduler, RNG, data position),
                                   recipe.yaml (the resolved recipe) and run.json (run id, recipe fingerprint)
    OUT/checkpoints/latest         the name of the newest complete checkpoint

`RunCheckpoints` owns that folder for one run:

- `start(resume, overwrite)` cleans what a kill -9 left (hidden `.step-*.tmp` directories and `.NAME.*.tmp`
  files), then either returns the checkpoint to resume from -- after checking it belongs to this recipe
  (same run kind, same recipe up to the keys a resumed run may change) -- or, for a fresh run, refuses an
  OUT that already holds checkpoints unless `overwrite` (then they are deleted).
- `save(step, write)` builds the step directory in a hidden temporary, fsyncs it, renames it into place and
  only then points `latest` at it: a crash at any moment leaves the previous checkpoint as `latest`.
- Pruning keeps the `keep` newest checkpoints of THIS run by step number; checkpoints of other runs and
  this run's checkpoints newer than the one just written are never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import load_trainer_state, save_trainer_state
from ..errors import CheckpointError, OutputPathError, TrainingInterrupted
from ..fsio import atomic_directory, atomic_write_text, check_writable_dir, fsync_dir, remove_stale_temporaries

CHECKPOINTS = "checkpoints"
LATEST = "latest"
RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yaml"
LEGACY_RUN = "legacy"  # checkpoints written before run ids existed
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    """The directory name of the checkpoint after `step` optimizer steps (`step-000500`)."""
    return f"step-{step:06d}"


def step_of(path: Path) -> int | None:
    """The step number of a checkpoint directory, or None when `path` is not one."""
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def step_dirs(out_dir: Path) -> list[Path]:
    """The complete checkpoint directories under OUT/checkpoints, by step number."""
    ck = Path(out_dir) / CHECKPOINTS
    if not ck.is_dir():
        return []
    return sorted((p for p in ck.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of OUT (the `latest` pointer, else the highest step), or None."""
    ck = Path(out_dir) / CHECKPOINTS
    pointer = ck / LATEST
    if pointer.is_file():
        p = ck / pointer.read_text().strip()
        if p.is_dir() and step_of(p) is not None:
            return p
    steps = step_dirs(out_dir)
    return steps[-1] if steps else None


def flat_recipe(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1} (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_recipe(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_fingerprint(recipe: dict[str, Any], resumable: Iterable[str]) -> str:
    """A hash of the recipe's keys that a resumed run may not change (16 hex digits)."""
    flat = flat_recipe(recipe)
    kept = {k: v for k, v in flat.items() if k not in set(resumable)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_diffs(saved: dict[str, Any], current: dict[str, Any], resumable: Iterable[str]) -> list[str]:
    """'key: checkpoint X vs recipe Y' for each flat key that differs and may not change on resume."""
    a, b = flat_recipe(saved), flat_recipe(current)
    keys = sorted((set(a) | set(b)) - set(resumable))
    return [f"{k}: checkpoint {a.get(k)!r} vs recipe {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def read_run_info(checkpoint: Path) -> dict[str, Any]:
    """run.json of a checkpoint ({} for a checkpoint written before run ids existed)."""
    f = checkpoint / RUN_FILE
    if not f.is_file():
        return {}
    try:
        info = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{f} is corrupt; delete {checkpoint} to resume from an older checkpoint") from None
    return info if isinstance(info, dict) else {}


class RunCheckpoints:
    """The checkpoints of one training run under OUT/checkpoints (see the module docstring).

    `kind` names the loop ("pretrain", "finetune", ...): a run never resumes another kind's checkpoint.
    `recipe` is the resolved recipe as a dict and `resumable` the flat keys (`train.steps`) a resumed run may
    change; every other key must match the checkpoint's recipe.
    """

    def __init__(self, out_dir: str | os.PathLike, kind: str, recipe: dict[str, Any], resumable: Iterable[str],
                 console=None) -> None:
        self.out = Path(out_dir)
        self.ck = self.out / CHECKPOINTS
        self.kind = kind
        self.recipe = recipe
        self.resumable = frozenset(resumable)
        self.fingerprint = recipe_fingerprint(recipe, self.resumable)
        self.console = console
        self.run_id: str | None = None
        self.last_saved_step: int | None = None

    # ------------------------------------------------------------------ start
    def clean_stale(self) -> list[Path]:
        """Remove the hidden temporaries that an interrupted save left in OUT, OUT/checkpoints and OUT's parent."""
        removed = remove_stale_temporaries(self.out.parent, [self.out.name])
        removed += remove_stale_temporaries(self.ck)
        removed += remove_stale_temporaries(self.out)
        return removed

    def start(self, resume: bool, overwrite: bool = False, is_main: bool = True) -> Path | None:
        """Prepare OUT for this run; return the checkpoint to resume from (None: start from scratch).

        Raises OutputPathError when OUT runs through a file, or when a fresh run (no `resume`) would write
        into an OUT that holds checkpoints of an earlier run and `overwrite` is not set. Under several
        processes every one calls it and reaches the same verdict; only `is_main` cleans and deletes, and
        its `run_id` is the one to share.
        """
        check_writable_dir(self.out)
        if is_main:
            self.clean_stale()
            self.out.mkdir(parents=True, exist_ok=True)
        found = latest_checkpoint(self.out) if resume else None
        if found is not None:
            self._check_belongs(found)
            self.run_id = read_run_info(found).get("run_id") or LEGACY_RUN
            self.last_saved_step = step_of(found)
            return found
        existing = step_dirs(self.out)
        if existing and not resume:
            if not overwrite:
                raise OutputPathError(
                    f"{self.out} already holds checkpoints of an earlier run (newest {existing[-1].name}): pass "
                    "--resume to continue it, --overwrite to replace it, or choose another output directory")
            if is_main:
                for p in existing:
                    shutil.rmtree(p)
                (self.ck / LATEST).unlink(missing_ok=True)
                fsync_dir(self.ck)
        if resume and self.console is not None:
            self.console.print(f"[yellow]no checkpoint in {self.ck}; starting from scratch[/]")
        self.run_id = uuid.uuid4().hex
        return None

    def _check_belongs(self, found: Path) -> None:
        info = read_run_info(found)
        if info.get("kind", self.kind) != self.kind:
            raise CheckpointError(f"{found} is a {info['kind']} checkpoint, not {self.kind}: use another output "
                                  "directory")
        if info.get("recipe_fingerprint") == self.fingerprint:
            return
        try:
            saved = yaml.safe_load((found / RECIPE_FILE).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise CheckpointError(f"cannot read {found / RECIPE_FILE} ({type(e).__name__}); the checkpoint is "
                                  "incomplete: delete it to resume from an older one") from None
        diffs = recipe_diffs(saved if isinstance(saved, dict) else {}, self.recipe, self.resumable)
        if diffs:
            raise CheckpointError(f"the recipe does not match the checkpoint {found} ({'; '.join(diffs[:3])}); "
                                  "resume with the same recipe (only how long and how often to log, evaluate and "
                                  "save may change) or use a new output directory")

    def load_state(self, checkpoint: Path) -> dict[str, Any]:
        """The trainer state (trainer_state/state.pt) of `checkpoint`."""
        return load_trainer_state(checkpoint)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any], write: Callable[[Path], None] | None = None,
             keep: int = 2, recipe: dict[str, Any] | None = None) -> Path:
        """Write checkpoint `step`: `write(tmp_dir)` adds the trainer's files (model weights, tokenizer),
        then the trainer `state`, recipe.yaml (`recipe`, when the run changed it since start) and run.json;
        rename into place, point `latest` at it, prune."""
        if self.run_id is None:
            raise RuntimeError("RunCheckpoints.start() must run before save()")
        if recipe is not None:
            self.recipe = recipe
        name = step_name(step)
        target = self.ck / name
        self.ck.mkdir(parents=True, exist_ok=True)
        aside = None
        if target.exists():  # the same step saved again (e.g. re-trained after resuming from an older one)
            aside = self.ck / f".{name}.old.tmp"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(target, aside)
        with atomic_directory(target) as tmp:
            if write is not None:
                write(tmp)
            save_trainer_state(tmp, state)
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(self.recipe, sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")
            (tmp / RUN_FILE).write_text(json.dumps({"run_id": self.run_id, "kind": self.kind, "step": step,
                                                    "recipe_fingerprint": self.fingerprint}, indent=2) + "\n")
        atomic_write_text(self.ck / LATEST, name + "\n")
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        self.last_saved_step = step
        self.prune(step, keep)
        return target

    def prune(self, newest: int, keep: int) -> list[Path]:
        """Delete this run's checkpoints older than the `keep` newest up to step `newest`; returns them."""
        ours = [p for p in step_dirs(self.out) if step_of(p) <= newest
                and (read_run_info(p).get("run_id") or LEGACY_RUN) == self.run_id]
        doomed = ours[: max(0, len(ours) - keep)]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        return doomed


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM only set `received` (the signal number): the training
    loop finishes its step, saves and raises TrainingInterrupted. A second signal interrupts at once
    (KeyboardInterrupt; saves are atomic, so that is safe too). Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


__all__ = ["StopSignals", "RunCheckpoints", "latest_checkpoint", "step_dirs", "step_name", "step_of",
           "recipe_diffs", "recipe_fingerprint", "flat_recipe", "read_run_info", "CHECKPOINTS", "LATEST", "RUN_FILE"]
