"""Each head type learns a small real task clearly above its trivial baseline (tiny random trunk, CPU).

Data: the builtin sets (fortunes, brown_pos) and sets derived from them (brown_names: BIO proper-noun
chunks from the Brown tags; fortunes_qa: "Who said this?" -> the attribution after " -- "; a generative
version of fortunes where the LM head writes the category name). Baselines: majority class / most frequent
tag, first words of the context (QA), the majority label as the generated text.
"""

from __future__ import annotations

import json

import pytest
import torch

from seekformer.evaluation.metrics import baseline_metrics
from seekformer.training.multitask import MultiTaskTrainer
from seekformer.training.multitask_recipe import finetune_recipe_from_dict

from .test_multitask import make_tiny_base



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("learn") / "base")


def run(base, out, tasks, **train):
    """Fine-tune and return (trainer, validation results)."""
    settings = {"steps": 80, "batch_size": 16, "lr": 3e-3, "progress": False, "test": False, "log_every": 10,
                "warmup_steps": 10, **train}
    weighting = settings.pop("weighting", {})
    lora = settings.pop("lora", {})
    recipe = finetune_recipe_from_dict({"base": base, "out": str(out), "tasks": tasks, "train": settings,
                                        "weighting": weighting, "lora": lora})
    trainer = MultiTaskTrainer(recipe)
    result = trainer.run()
    return trainer, result.results["validation"]


def baseline(trainer, name):
    d = trainer.data[name]
    return baseline_metrics(d.decl, d.train, d.validation)


def test_classification_learns_fortune_categories(base, tmp_path):
    tr, val = run(base, tmp_path / "cls", [{"train": "builtin:fortunes", "max_train_examples": 1200,
                                           "max_eval_examples": 200, "pooling": "mean"}], steps=70)
    m, b = val["fortunes"], baseline(tr, "fortunes")
    assert m["accuracy"] > b["accuracy"] + 0.1, (m, b)  # majority class: ~0.2 of 6 categories
    assert m["macro_f1"] > b["macro_f1"] + 0.15


def test_tagging_learns_pos_tags(base, tmp_path):
    tr, val = run(base, tmp_path / "pos", [{"train": "builtin:brown_pos", "max_train_examples": 600,
                                           "max_eval_examples": 150}], steps=50)
    m, b = val["brown_pos"], baseline(tr, "brown_pos")
    assert m["token_accuracy"] > b["token_accuracy"] + 0.3, (m, b)  # most frequent tag: ~0.24


def test_bio_tagging_finds_name_entities(base, tmp_path):
    tr, val = run(base, tmp_path / "bio", [{"train": "builtin:brown_names", "max_train_examples": 800,
                                           "max_eval_examples": 200, "label_all_subwords": True}], steps=70)
    m, b = val["brown_names"], baseline(tr, "brown_names")
    assert b["entity_f1"] == 0.0  # all "O" finds no entity
    assert m["entity_f1"] > 0.2 and m["token_accuracy"] > b["token_accuracy"], (m, b)


def test_extractive_qa_learns_who_said_it(base, tmp_path):
    tr, val = run(base, tmp_path / "qa", [{"train": "builtin:fortunes_qa", "max_train_examples": 600,
                                          "max_eval_examples": 100}], steps=40)
    m, b = val["fortunes_qa"], baseline(tr, "fortunes_qa")
    assert m["f1"] > b["f1"] + 0.4 and m["exact_match"] > 0.3, (m, b)


def test_generation_writes_the_category_through_the_lm_head(base, tmp_path):
    from seekformer.data.builtin import read_task

    for split in ("train", "validation"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for r in read_task("fortunes", split):
                f.write(json.dumps({"text": r["text"], "category": r["label"]}) + "\n")
    task = {"name": "fortune_gen", "type": "generation", "train": str(tmp_path / "train.jsonl"),
            "validation": str(tmp_path / "validation.jsonl"), "fields": {"source": "text", "target": "category"},
            "max_train_examples": 1200, "max_eval_examples": 150, "max_new_tokens": 6, "max_length": 64}
    tr, val = run(base, tmp_path / "gen", [task], steps=160)
    m = val["fortune_gen"]
    golds = [e["target"] for e in tr.data["fortune_gen"].validation]
    majority = max(golds.count(g) for g in set(golds)) / len(golds)
    copy = baseline(tr, "fortune_gen")  # copying the source
    assert m["exact_match"] > majority + 0.1 and m["chrf"] > copy["chrf"] + 20, (m, majority, copy)


def test_lora_learns_tagging_and_saves_a_plain_trunk(base, tmp_path):
    pytest.importorskip("peft")
    tr, val = run(base, tmp_path / "lora", [{"train": "builtin:brown_pos", "max_train_examples": 600,
                                            "max_eval_examples": 150}], method="lora", lr=1e-2, steps=50)
    assert val["brown_pos"]["token_accuracy"] > baseline(tr, "brown_pos")["token_accuracy"] + 0.25
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]


@pytest.mark.parametrize("weighting", [{"strategy": "fixed", "pcgrad": True}, {"strategy": "uncertainty"},
                                       {"strategy": "gradnorm"}, {"strategy": "dwa", "window": 2}])
def test_joint_training_logs_weights_losses_and_gradient_norms(base, tmp_path, weighting):
    tasks = [{"train": "builtin:fortunes", "max_train_examples": 64, "max_eval_examples": 16},
             {"train": "builtin:brown_pos", "max_train_examples": 64, "max_eval_examples": 16}]
    tr, val = run(base, tmp_path / "joint", tasks, steps=6, batch_size=4, log_every=2, weighting=weighting)
    recs = [json.loads(line) for line in (tmp_path / "joint" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if "loss/fortunes" in r][-1]
    for t in ("fortunes", "brown_pos"):
        assert {f"loss/{t}", f"weight/{t}", f"grad_norm/{t}"} <= set(last)
    weights = [(r["weight/fortunes"], r["weight/brown_pos"]) for r in recs if "weight/fortunes" in r]
    if weighting["strategy"] != "fixed":
        assert weights[-1] != (1.0, 1.0)  # the strategy moved the weights
    assert (tmp_path / "joint" / "finetune.png").stat().st_size > 1000
    assert set(val) == {"fortunes", "brown_pos"}


def test_temperature_sampling_trains_one_task_per_step(base, tmp_path):
    tasks = [{"train": "builtin:fortunes", "max_train_examples": 300, "max_eval_examples": 8},
             {"train": "builtin:brown_pos", "max_train_examples": 30, "max_eval_examples": 8}]
    torch.manual_seed(0)
    run(base, tmp_path / "s", tasks, steps=40, batch_size=2, log_every=1, sampling="temperature", temperature=1.0)
    recs = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
            if '"loss/' in line]
    assert all(sum(k.startswith("loss/") for k in r) == 1 for r in recs)
    big = sum("loss/fortunes" in r for r in recs)
    assert big > 28  # p = 300/330 for the bigger task
