"""Safe resume (issue 16 items 6-9): one run per OUT, checkpoints that belong to their recipe, pruning within a
run, stale temporaries cleaned, output paths under a file, Ctrl-C/SIGTERM that save and resume bit-exact, and
training knobs changed on resume that take effect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seekformer.errors import CheckpointError, OutputPathError, TrainingInterrupted
from seekformer.training.checkpointing import (LATEST, RUN_FILE, RunCheckpoints, latest_checkpoint, read_run_info,
                                               step_dirs)
from seekformer.training.trainer import Trainer

from .test_cli_errors import assert_user_error, run_cli
from .test_training import _losses, make_recipe

RESUMABLE = {"train.steps"}


@pytest.fixture
def corpus(tmp_path, small_text) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(small_text)
    return p


def ckpts(out: Path, recipe: dict | None = None, kind: str = "test") -> RunCheckpoints:
    return RunCheckpoints(out, kind, recipe or {"train": {"lr": 1.0, "steps": 10}}, RESUMABLE)


# ---------------------------------------------------------------- the checkpoint folder, without a model
def test_fresh_run_refuses_an_out_with_checkpoints_unless_overwrite(tmp_path):
    old = ckpts(tmp_path / "out")
    assert old.start(resume=False) is None
    old.save(100, {"x": 1})
    with pytest.raises(OutputPathError, match="--resume to continue it, --overwrite"):
        ckpts(tmp_path / "out").start(resume=False)
    new = ckpts(tmp_path / "out")
    assert new.start(resume=False, overwrite=True) is None
    assert step_dirs(tmp_path / "out") == [] and not (tmp_path / "out" / "checkpoints" / LATEST).exists()
    assert new.run_id != old.run_id


def test_resume_checks_the_recipe_and_the_kind(tmp_path):
    run = ckpts(tmp_path / "out")
    run.start(resume=False)
    run.save(4, {"step": 4})
    longer = ckpts(tmp_path / "out", {"train": {"lr": 1.0, "steps": 20}})  # steps may change
    found = longer.start(resume=True)
    assert found.name == "step-000004" and longer.run_id == run.run_id
    assert longer.load_state(found) == {"step": 4}
    with pytest.raises(CheckpointError, match=r"train.lr: checkpoint 1.0 vs recipe 2.0"):
        ckpts(tmp_path / "out", {"train": {"lr": 2.0, "steps": 10}}).start(resume=True)
    with pytest.raises(CheckpointError, match="is a test checkpoint, not finetune"):
        ckpts(tmp_path / "out", kind="finetune").start(resume=True)


def test_pruning_goes_by_step_within_this_run(tmp_path):
    out = tmp_path / "out"
    old = ckpts(out)
    old.start(resume=False)
    old.save(100, {})
    new = ckpts(out)
    new.start(resume=False, overwrite=True)
    # an older run's checkpoint that --overwrite did not see (e.g. copied in later) is not this run's to prune
    other = ckpts(out)
    other.run_id = "someone-else"
    other.save(100, {})
    for step in (5, 10, 15):
        new.save(step, {}, keep=2)
    names = [p.name for p in step_dirs(out)]
    assert names == ["step-000010", "step-000015", "step-000100"]  # step-15 stays, the other run's 100 too
    assert latest_checkpoint(out).name == "step-000015"
    assert read_run_info(out / "checkpoints" / "step-000100")["run_id"] == "someone-else"
    # this run resumed from step 10 (say `latest` was lost): its newer step-15 is never pruned by older saves
    (out / "checkpoints" / LATEST).write_text("step-000010\n")
    again = ckpts(out)
    assert again.start(resume=True).name == "step-000010"
    again.save(12, {}, keep=1)
    assert [p.name for p in step_dirs(out)] == ["step-000012", "step-000015", "step-000100"]


def test_stale_temporaries_of_a_killed_save_are_removed_at_start(tmp_path):
    out = tmp_path / "out"
    ck = out / "checkpoints"
    for d in (ck / ".step-000004.k2j3.tmp" / "trainer_state", tmp_path / ".out.x8a.tmp"):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"0" * 1000)
    (ck / ".latest.abc.tmp").write_text("step")
    (out / ".config.json.q1.tmp").write_text("{")
    (tmp_path / ".other.q1.tmp").mkdir()  # another directory's temporary: not ours
    ckpts(out).start(resume=False)
    assert sorted(p.name for p in tmp_path.rglob(".*.tmp")) == [".other.q1.tmp"]


def test_output_path_under_a_regular_file(tmp_path, corpus):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a directory"):
        ckpts(f / "x").start(resume=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"preset": "tiny"}, "data": {"sources": [str(corpus)]},
                                  "train": {"out": str(f / "x"), "progress": False}}))
    assert_user_error(run_cli("pretrain", str(recipe)), "is a file, not a directory")


# ---------------------------------------------------------------- the pretraining loop
def test_fresh_pretrain_into_an_old_run_is_refused(tmp_path, corpus):
    Trainer(make_recipe(tmp_path, corpus, steps=2, save_every=2, eval_every=2)).run()
    with pytest.raises(OutputPathError, match="already holds checkpoints"):
        Trainer(make_recipe(tmp_path, corpus, steps=2)).prepare()
    t = Trainer(make_recipe(tmp_path, corpus, steps=2, overwrite=True))
    t.prepare()
    assert t.step == 0 and latest_checkpoint(tmp_path / "run") is None


def _interrupt_at(step: int, signum: int):
    def on_step(trainer) -> None:
        if trainer.step == step:
            os.kill(os.getpid(), signum)

    return on_step


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_the_run_resumes_bit_exact(tmp_path, corpus, signum):
    full = Trainer(make_recipe(tmp_path / "a", corpus, save_every=100, eval_every=100, log_every=1))
    full.prepare()
    expected = _losses(full, 8)

    first = Trainer(make_recipe(tmp_path / "b", corpus, save_every=100, eval_every=100, log_every=1))
    first.on_step = _interrupt_at(3, signum)
    with pytest.raises(TrainingInterrupted) as e:
        first.run()
    assert e.value.signum == signum and e.value.checkpoint.name == "step-000003"
    assert signal.getsignal(signum) is not first  # handlers restored
    resumed = Trainer(make_recipe(tmp_path / "b", corpus, save_every=100, eval_every=100, log_every=1, resume=True))
    resumed.prepare()
    assert resumed.step == 3
    assert [loss for _, loss in first_losses(tmp_path / "b")] == expected[:3]
    assert _losses(resumed, 5) == expected[3:]  # bit-identical


def first_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_changed_balance_loss_weight_takes_effect_on_resume(tmp_path, corpus):
    def recipe(alpha: float, **train):
        r = make_recipe(tmp_path, corpus, **{"steps": 4, "save_every": 2, "eval_every": 100, **train})
        r.model["seq_aux_loss_alpha"] = alpha
        return r

    t = Trainer(recipe(0.0, steps=2))
    t.run()
    assert "aux_loss" not in t.train_step()  # alpha 0: no balance loss
    resumed = Trainer(recipe(0.5, resume=True))
    resumed.prepare()
    assert resumed.step == 2
    assert resumed.model.config.seq_aux_loss_alpha == 0.5
    assert all(moe.config is resumed.model.config for _, moe in resumed.model.moe_layers())
    rec = resumed.train_step()
    assert rec.get("aux_loss", 0.0) > 0  # the new alpha is used, not the checkpoint's 0.0


# ---------------------------------------------------------------- Ctrl-C on the command line
def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_ctrl_c_in_pretrain_saves_and_exits_130(tmp_path, corpus):
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(json.dumps({
        "model": {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                  "num_hidden_layers": 2, "num_attention_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                  "qk_rope_head_dim": 8, "v_head_dim": 8},
        "tokenizer": {"vocab_size": 300}, "data": {"sources": [str(corpus)]},
        "train": {"out": str(out), "steps": 100000, "seq_len": 16, "batch_size": 2, "eval_every": 0,
                  "eval_batches": 1, "save_every": 0, "log_every": 1, "progress": False, "threads": 1}}))
    proc = subprocess.Popen([sys.executable, "-m", "seekformer", "pretrain", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and '"loss"' in metrics.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted; state saved in")
    found = latest_checkpoint(out)
    assert found is not None and (found / RUN_FILE).is_file()
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert int(found.name.split("-")[1]) == steps[-1]
