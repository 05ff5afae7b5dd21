"""`seekformer audit canaries`: a non-private fine-tune memorizes inserted secrets (high exposure), a DP-SGD
run of the same recipe does not (slow: two short fine-tunes of a tiny model)."""

from __future__ import annotations

import json

import pytest

from seekformer.cli import main

from .test_finetune_cli import user_error, write_jsonl
from .test_multitask import make_tiny_base

WORDS = "river stone light green cloud small bird open road quiet".split()
ROWS = [{"source": " ".join(WORDS[i % 10: i % 10 + 3]), "target": " ".join(WORDS[(i * 3) % 10: (i * 3) % 10 + 4])}
        for i in range(40)]


def _recipe(tmp_path, base, name, privacy=None, steps=80):
    train = write_jsonl(tmp_path / "gen.jsonl", ROWS)
    d = {"base": base, "out": str(tmp_path / name),
         "tasks": [{"name": "gen", "type": "generation", "train": train, "max_length": 32}],
         "train": {"steps": steps, "batch_size": 8, "lr": 3e-3, "method": "full", "progress": False,
                   "validate": False, "test": False, "warmup_steps": 0}}
    if privacy:
        d["privacy"] = privacy
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(d))
    return str(p)


@pytest.mark.slow
def test_dp_run_shows_low_exposure_where_plain_run_memorizes(tmp_path):
    base = make_tiny_base(tmp_path / "base")
    args = ["--canaries", "3", "--repeats", "10", "--secret-length", "5", "--candidates", "127"]
    main(["audit", "canaries", _recipe(tmp_path, base, "plain"), *args])
    plain = json.loads((tmp_path / "plain" / "canaries.json").read_text())
    main(["audit", "canaries", _recipe(tmp_path, base, "dp", {"epsilon": 1.0, "delta": 1e-4}), *args])
    dp = json.loads((tmp_path / "dp" / "canaries.json").read_text())
    assert plain["max_measurable_exposure"] == 7.0 and not plain["private"] and dp["private"]
    assert plain["mean_exposure"] > 5.0, plain  # memorized: ranked first or nearly among 128
    assert dp["mean_exposure"] < 3.5, dp  # like a secret never seen (about 1.4 bits expected)
    assert dp["privacy"]["epsilon"] <= 1.0


def test_audit_needs_a_generation_task(tmp_path, capsys):
    base = make_tiny_base(tmp_path / "base")
    p = tmp_path / "cls.yaml"
    train = write_jsonl(tmp_path / "c.jsonl", [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}])
    p.write_text(json.dumps({"base": base, "tasks": [{"name": "c", "type": "classification", "train": train}]}))
    user_error(capsys, ["audit", "canaries", str(p)], "needs a recipe with one generation task")
