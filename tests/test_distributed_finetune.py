"""Multi-process `seekformer finetune` (gloo, 2 processes on this CPU): the 1-process loss at every step,
checkpoints that resume on another world size, and one-line errors for settings that cannot run.

Three tasks on a tiny MoE trunk -- classification (a row-mean loss, a head), generation (a token-mean loss
through the LM head, 3 examples: a batch of 3 rows splits 2 + 1) and tagging (a token-mean loss, a head) --
with DWA loss weighting and PCGrad, so each task's trunk gradient must be the global one before PCGrad.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from .test_distributed import _env, _port
from .test_finetune_cli import write_jsonl
from .test_multitask import make_tiny_base

STEPS = 8
WORDS = "the cat sat on a mat while stocks fell and the market rose again today".split()


def _texts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def _records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _losses(out) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k.startswith("loss")} for r in _records(out) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_ft")
    base = make_tiny_base(root / "base")
    cls_rows = [{"text": t, "label": "pets" if "cat" in t else "money"} for t in _texts(12, 0)]
    gen_rows = [{"source": t, "target": " ".join(reversed(t.split()))} for t in _texts(3, 1)]
    tasks = [{"name": "topic", "type": "classification", "train": write_jsonl(root / "cls.jsonl", cls_rows),
              "validation": write_jsonl(root / "cls_val.jsonl", cls_rows[:4]), "dropout": 0.0},
             {"name": "rev", "type": "generation", "train": write_jsonl(root / "gen.jsonl", gen_rows)},
             {"name": "pos", "train": "builtin:brown_pos", "max_train_examples": 24, "max_eval_examples": 4,
              "dropout": 0.0}]  # dropout draws its masks per rank: parity holds without it
    recipe = {"base": base, "tasks": tasks, "weighting": {"strategy": "dwa", "pcgrad": True},
              "train": {"steps": STEPS, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "save_every": 4,
                        "keep_checkpoints": 3, "log_every": 1, "progress": False, "threads": 1, "test": False}}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))

    def run(name: str, nproc: int, *args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "seekformer", "finetune", str(root / "r.yaml"), "--out", str(root / name), *args]
        if nproc > 1 and torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(_port()), *cmd[1:]]
        elif nproc > 1:
            cmd += ["--nproc", str(nproc)]
        return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)

    out = {"root": root, "run": run}
    for name, nproc, torchrun in [("one", 1, False), ("two", 2, False), ("two_torchrun", 2, True)]:
        p = run(name, nproc, torchrun=torchrun)
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = _losses(root / name)
    return out


@pytest.mark.parametrize("name", ["two", "two_torchrun"])
def test_two_processes_give_the_one_process_losses_at_every_step(runs, name):
    one, two = runs["one"], runs[name]
    assert len(one) == len(two) == STEPS
    assert set(one[0]) == {"loss", "loss/topic", "loss/rev", "loss/pos"}
    assert one[-1]["loss"] < one[0]["loss"]  # it trains
    diffs = [abs(a[k] - b[k]) for a, b in zip(one, two) for k in a]
    assert max(diffs) < 1e-5, diffs


def test_rank_zero_alone_writes_the_model_and_results(runs):
    root = runs["root"]
    one = json.loads((root / "one" / "results.json").read_text())
    two = json.loads((root / "two" / "results.json").read_text())
    assert set(two["validation"]) == {"topic", "pos"}
    for task, metrics in one["validation"].items():
        for k, v in metrics.items():
            assert abs(v - two["validation"][task][k]) < 1e-3, (task, k)
    assert len([r for r in _records(root / "two") if "loss" in r]) == STEPS  # one logger, not one per rank


def _resume(runs, src: str, dst: str, nproc: int) -> list[dict[str, float]]:
    root = runs["root"]
    (root / dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / src / "checkpoints" / "step-000004", root / dst / "checkpoints" / "step-000004")
    (root / dst / "checkpoints" / "latest").write_text("step-000004\n")
    p = runs["run"](dst, nproc, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    return _losses(root / dst)


@pytest.mark.parametrize("src, dst, nproc", [("two", "two_to_one", 1), ("one", "one_to_two", 2)])
def test_checkpoint_resumes_on_another_world_size(runs, src, dst, nproc):
    resumed = _resume(runs, src, dst, nproc)
    assert len(resumed) == STEPS - 4
    assert max(abs(a[k] - b[k]) for a, b in zip(resumed, runs["one"][4:]) for k in a) < 1e-5


@pytest.mark.parametrize("args, needle", [(["--train.batch_size", "3"], "does not split"),
                                          (["--parallel.strategy", "fsdp"], "strategy ddp")])
def test_bad_parallel_finetune_is_one_line_and_exit_2(runs, args, needle):
    p = runs["run"]("bad", 2, *args)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_bad_finetune_under_torchrun_exits_2_on_every_rank(runs):
    p = runs["run"]("bad_torchrun", 2, "--parallel.expert_parallel", "2", torchrun=True)
    assert p.returncode != 0
    assert p.stderr.count("error: parallel.expert_parallel=2") == 1, p.stderr  # rank 0 only
    assert "exitcode  : 2" in p.stderr or "exitcode: 2" in p.stderr, p.stderr
