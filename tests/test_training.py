"""Recipes, the trainer (learning, exact resume, atomic checkpoints) and the CLI's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seekformer.errors import CheckpointError, RecipeError
from seekformer.training.recipe import apply_overrides, load_recipe, recipe_from_dict
from seekformer.training.trainer import Trainer, latest_checkpoint

TINY_MODEL = dict(preset="tiny", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  num_nextn_predict_layers=1)


def make_recipe(tmp_path: Path, corpus: Path, **train) -> "Recipe":  # noqa: F821
    t = dict(out=str(tmp_path / "run"), seq_len=32, batch_size=4, steps=8, lr=3e-3, warmup_steps=2,
             eval_every=4, eval_batches=2, save_every=4, log_every=2, progress=False)
    t.update(train)
    return recipe_from_dict({"model": TINY_MODEL, "tokenizer": {"vocab_size": 300},
                             "data": {"sources": [str(corpus)], "val_fraction": 0.1}, "train": t})


@pytest.fixture
def corpus(tmp_path, small_text) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(small_text)
    return p


# ---------------------------------------------------------------- recipes
def test_builtin_recipes_load_and_overrides_apply():
    r = load_recipe("quickstart", ["--train.lr", "1e-4", "--train.steps=7", "--model.hidden_size", "128"])
    assert r.train.lr == 1e-4 and r.train.steps == 7 and r.model["hidden_size"] == 128
    for name in ("tiny", "small"):
        load_recipe(name)


@pytest.mark.parametrize("overrides, message", [
    (["--train.nope", "1"], "unknown recipe key 'train.nope'"),
    (["--train.lr", "fast"], "train.lr expects a number"),
    (["--train.steps", "1.5"], "train.steps expects an integer"),
    (["--model.hidden_sise", "3"], "unknown recipe key 'model.hidden_sise'"),
    (["--model.preset", "huge"], "model.preset 'huge' is unknown"),
    (["--oops.key", "1"], "unknown recipe section"),
    (["--train.lr"], "needs a value"),
])
def test_recipe_errors_name_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("quickstart", overrides)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no/such/recipe.yaml")


def test_apply_overrides_does_not_mutate_input():
    d = {"train": {"lr": 1.0}}
    apply_overrides(d, ["--train.lr", "2"])
    assert d["train"]["lr"] == 1.0


# ---------------------------------------------------------------- training
def test_training_learns_logs_and_checkpoints(tmp_path, corpus):
    recipe = make_recipe(tmp_path, corpus, steps=30, eval_every=10, save_every=10, lr=5e-3)
    result = Trainer(recipe).run()
    assert result.steps == 30
    assert result.val_losses[-1][1] < result.val_losses[0][1] - 0.5
    out = tmp_path / "run"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "recipe.yaml",
              "metrics.jsonl", "training.png", "generation_config.json"):
        assert (out / f).is_file(), f
    assert latest_checkpoint(out).name == "step-000030"
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if "loss" in r][-1]
    load_keys = [k for k in last_train if k.startswith("load_max_over_mean/")]
    assert load_keys and "load_fractions" in last_train and "tokens_per_s" in last_train
    assert any(k.startswith("load_max_over_mean/MTP") for k in load_keys)
    from seekformer import SeekForCausalLM

    model = SeekForCausalLM.from_pretrained(out)
    assert model.config.num_nextn_predict_layers == 1


def _losses(trainer: Trainer, n: int) -> list[float]:
    return [trainer.train_step()["loss"] for _ in range(n)]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    full = Trainer(make_recipe(tmp_path / "a", corpus))
    full.prepare()
    expected = _losses(full, 8)
    biases = [m.gate.e_score_correction_bias.clone() for _, m in full.model.moe_layers()]

    first = Trainer(make_recipe(tmp_path / "b", corpus))
    first.prepare()
    head = _losses(first, 4)
    first.save_checkpoint()
    del first
    resumed = Trainer(make_recipe(tmp_path / "b", corpus, resume=True))
    resumed.prepare()
    assert resumed.step == 4
    tail = _losses(resumed, 4)
    assert head + tail == expected  # bit-identical losses at every step
    for b, (_, m) in zip(biases, resumed.model.moe_layers()):
        assert torch.equal(b, m.gate.e_score_correction_bias)


def test_resume_with_a_different_model_is_refused(tmp_path, corpus):
    t = Trainer(make_recipe(tmp_path, corpus, steps=2, save_every=2, eval_every=2))
    t.run()
    r = make_recipe(tmp_path, corpus, steps=4, resume=True)
    r.model["hidden_size"] = 96
    with pytest.raises(CheckpointError, match="does not match"):
        Trainer(r).prepare()


def test_crash_during_checkpoint_keeps_latest(tmp_path, corpus, monkeypatch):
    import seekformer.checkpoint as ck

    t = Trainer(make_recipe(tmp_path, corpus))
    t.prepare()
    _losses(t, 2)
    good = t.save_checkpoint()
    _losses(t, 2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run") == good
    resumed = Trainer(make_recipe(tmp_path, corpus, resume=True))
    resumed.prepare()
    assert resumed.step == 2
