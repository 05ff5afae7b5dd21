"""`seekformer finetune` / `seekformer eval --task`: end to end, and one-line errors (exit 2) for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from seekformer.cli import main

from .test_multitask import make_tiny_base



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("cli") / "base")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(tmp_path, base, tasks, weighting="fixed", steps=2):
    p = tmp_path / "recipe.yaml"
    p.write_text(json.dumps({"base": base, "out": str(tmp_path / "out"), "tasks": tasks,
                             "train": {"steps": steps, "batch_size": 4, "progress": False, "eval_examples": 8},
                             "weighting": {"strategy": weighting}}))
    return str(p)


def user_error(capsys, argv, fragment):
    capsys.readouterr()  # only what this command prints (fixtures may have logged before)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert fragment in err[0], err[0]


ROWS = [{"text": "the cat sat", "label": "pets"}, {"text": "stocks fell", "label": "money"}] * 4


def test_finetune_then_eval_prints_json(base, tmp_path):
    """finetune (in process), then the real `seekformer eval --json` command line in a subprocess."""
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:4])
    r = recipe(tmp_path, base, [{"name": "topic", "type": "classification", "train": train, "validation": test},
                                {"name": "pos", "train": "builtin:brown_pos", "max_train_examples": 16,
                                 "max_eval_examples": 4}], steps=3)
    main(["finetune", r, "--train.steps", "2"])
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and set(results["test"]) == {"pos"} and set(results["validation"]) == {"topic", "pos"}
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["steps"] == 2  # the resolved recipe
    proc = subprocess.run([sys.executable, "-m", "seekformer", "eval", str(out), "--task", "topic", "--data", test,
                           "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(metrics) >= {"accuracy", "macro_f1"} and 0 <= metrics["accuracy"] <= 1


def test_eval_of_a_recorded_split_and_a_recipe(base, tmp_path, capsys):
    from seekformer.cli.evaluate import evaluate_task_cli

    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    r = recipe(tmp_path, base, [{"name": "topic", "type": "classification", "train": train, "test": train}], steps=1)
    main(["finetune", r])
    capsys.readouterr()
    m = evaluate_task_cli(tmp_path / "out", "topic", json_out=True, output=tmp_path / "m.json")
    assert json.loads(capsys.readouterr().out) == m == json.loads((tmp_path / "m.json").read_text())
    assert evaluate_task_cli(tmp_path / "out", r)["examples"] == len(ROWS)  # --task RECIPE: its test split
    user_error(capsys, ["eval", str(tmp_path / "out"), "--task", "nope"], "has no task 'nope'")
    user_error(capsys, ["eval", base, "--task", "topic"], "not a fine-tuned multi-task model")


@pytest.mark.parametrize("case", ["missing_field", "unknown_label", "uninferable", "empty", "tag_lengths",
                                  "qa_answer", "task_type", "weighting"])
def test_data_and_recipe_errors(base, tmp_path, capsys, case):
    w = "fixed"
    if case == "missing_field":
        rows = [{"txt": "x", "label": "a"}, {"txt": "y", "label": "b"}]
        task = {"name": "t", "type": "classification", "train": write_jsonl(tmp_path / "a.jsonl", rows)}
        want = "no field 'text'"
    elif case == "unknown_label":
        task = {"name": "t", "type": "classification", "labels": ["pets", "money"],
                "train": write_jsonl(tmp_path / "a.jsonl", ROWS + [{"text": "hi", "label": "sport"}])}
        want = "label 'sport' is not in the label set"
    elif case == "uninferable":
        task = {"name": "t", "type": "classification", "train": write_jsonl(tmp_path / "a.jsonl", ROWS[:1])}
        want = "cannot infer a label set"
    elif case == "empty":
        (tmp_path / "e.jsonl").write_text("")
        task = {"name": "t", "type": "classification", "train": write_jsonl(tmp_path / "a.jsonl", ROWS),
                "validation": str(tmp_path / "e.jsonl")}
        want = "is empty"
    elif case == "tag_lengths":
        task = {"name": "t", "type": "tagging", "train": write_jsonl(tmp_path / "a.jsonl", [
            {"tokens": ["a", "b"], "tags": ["X", "Y"]}, {"tokens": ["a", "b", "c"], "tags": ["X", "Y"]}])}
        want = "3 tokens but 2 tags"
    elif case == "qa_answer":
        task = {"name": "t", "type": "qa", "train": write_jsonl(tmp_path / "a.jsonl", [
            {"context": "Paris is in France.", "question": "Where?", "answers": "Spain"}])}
        want = "does not occur in its context"
    elif case == "task_type":
        task = {"name": "t", "type": "regression", "train": "x.jsonl"}
        want = "unknown type 'regression'"
    else:
        task = {"name": "t", "type": "classification", "train": write_jsonl(tmp_path / "a.jsonl", ROWS)}
        w, want = "magic", "unknown weighting.strategy 'magic'"
    user_error(capsys, ["finetune", recipe(tmp_path, base, [task], weighting=w)], want)


def test_base_errors(tmp_path, capsys):
    task = {"name": "t", "type": "classification", "train": write_jsonl(tmp_path / "a.jsonl", ROWS)}
    user_error(capsys, ["finetune", recipe(tmp_path, str(tmp_path / "missing"), [task])], "does not exist")
    (tmp_path / "notmodel").mkdir()
    user_error(capsys, ["finetune", recipe(tmp_path, str(tmp_path / "notmodel"), [task])], "has no config.json")
    user_error(capsys, ["finetune", recipe(tmp_path, str(tmp_path / "notmodel"), [task]), "--train.nope", "1"],
               "unknown recipe key 'train.nope'")


def test_builtin_recipe_runs(base, tmp_path):
    """finetune_builtin (the three shipped task sets together), shortened: 2 steps, few evaluation examples."""
    cut = [a for t in ("fortunes", "brown_pos", "kjv_es") for a in (f"--tasks.{t}.max_eval_examples", "8")]
    main(["finetune", "finetune_builtin", "--base", base, "--out", str(tmp_path / "ft"), "--train.steps", "2",
          "--train.eval_every", "0", "--tasks.kjv_es.max_new_tokens", "8", *cut])
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert set(results["test"]) == {"fortunes", "brown_pos", "kjv_es"}
    assert {"accuracy", "macro_f1"} <= set(results["test"]["fortunes"])
    assert {"token_accuracy", "entity_f1"} <= set(results["test"]["brown_pos"])
    assert {"bleu", "chrf"} <= set(results["test"]["kjv_es"])


@pytest.mark.parametrize("settings", [
    {"weighting": {"strategy": "uncertainty"}, "train": {"sampling": "temperature", "tasks_per_step": 1}},
    {"weighting": {"strategy": "dwa", "window": 2, "pcgrad": True},
     "train": {"method": "lora"},
     "lora": {"r": 4, "dropout": 0.1, "targets": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}},
], ids=["uncertainty-sampled", "dwa-pcgrad-lora"])
def test_finetune_resume_continues_exactly(base, tmp_path, settings):
    """Interrupted after step 3 with checkpoints every 2 steps, `--resume` continues from step 2 and ends
    with the losses and weights of an uninterrupted run (heads, LoRA, weighting, data order, RNGs)."""
    from seekformer.training.multitask import MultiTaskTrainer
    from seekformer.training.multitask_recipe import finetune_recipe_from_dict

    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    tasks = [{"name": "topic", "type": "classification", "train": train},
             {"name": "pos", "train": "builtin:brown_pos", "max_train_examples": 24, "max_eval_examples": 4}]

    def make(out, **train_keys):
        t = {"steps": 6, "batch_size": 4, "progress": False, "validate": False, "test": False, "log_every": 1,
             **settings.get("train", {}), **train_keys}
        d = {"base": base, "out": str(tmp_path / out), "tasks": [dict(x) for x in tasks], "train": t,
             **{k: v for k, v in settings.items() if k != "train"}}
        return MultiTaskTrainer(finetune_recipe_from_dict(d))

    def losses_of(trainer, stop_at=None):
        seen = []

        def hook(tr):
            seen.append((tr.step, json.dumps(_last_losses(tr.out))))
            if stop_at is not None and tr.step == stop_at:
                raise KeyboardInterrupt
        trainer.on_step = hook
        try:
            trainer.run()
        except KeyboardInterrupt:
            pass
        return seen

    ref_trainer = make("ref")
    ref = losses_of(ref_trainer)
    first = losses_of(make("run", save_every=2), stop_at=3)
    assert [s for s, _ in first] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-000002"]
    resumed_trainer = make("run", save_every=2, resume=True)
    resumed_trainer.prepare()
    assert resumed_trainer.step == 2
    resumed = losses_of(resumed_trainer)
    assert [s for s, _ in resumed] == [3, 4, 5, 6]
    assert first[:2] + resumed == ref
    a, b = ref_trainer.model.state_dict(), resumed_trainer.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ref_trainer.weighting.weights() == resumed_trainer.weighting.weights()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the interrupted run's step-3 record was dropped on resume
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept == ["step-000004", "step-000006"]


def _last_losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    return {k: v for k, v in rec.items() if k.startswith(("loss", "weight", "log_var"))}


def test_finetune_resume_refuses_a_different_recipe(base, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    r = recipe(tmp_path, base, [{"name": "topic", "type": "classification", "train": train}], steps=2)
    main(["finetune", r, "--train.save_every", "1", "--train.test", "false", "--train.validate", "false"])
    assert (tmp_path / "out" / "checkpoints" / "step-000002" / "trainer_state" / "state.pt").is_file()
    capsys.readouterr()
    user_error(capsys, ["finetune", r, "--resume", "--train.lr", "0.1"], "does not match the checkpoint")


def test_lora_dropout_on_experts_is_a_clear_error(base, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    r = recipe(tmp_path, base, [{"name": "topic", "type": "classification", "train": train}])
    user_error(capsys, ["finetune", r, "--train.method", "lora", "--lora.dropout", "0.1"], "lora.dropout must be 0")
