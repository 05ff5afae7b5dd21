"""DP-SGD pretraining (`seekformer pretrain` with a `privacy:` section): the account equals Opacus', the noisy
gradient is the clipped per-window sum plus the mechanism's noise, a run with little noise learns, and bad
settings are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from seekformer.errors import RecipeError
from seekformer.training.privacy.mechanism import DPSGD
from seekformer.training.privacy.recipe import PrivacyRecipe
from seekformer.training.recipe import recipe_from_dict
from seekformer.training.pretrain import pretrain

from .test_finetune_cli import user_error
from .test_training import TINY_MODEL


def dp_recipe(tmp_path, corpus, privacy, **train):
    t = dict(out=str(tmp_path / "run"), seq_len=24, batch_size=6, steps=8, lr=3e-3, warmup_steps=1,
             eval_every=8, eval_batches=2, save_every=0, log_every=1, progress=False)
    t.update(train)
    return recipe_from_dict({"model": TINY_MODEL, "tokenizer": {"vocab_size": 300},
                             "data": {"sources": [str(corpus)], "val_fraction": 0.1}, "train": t,
                             "privacy": privacy})


@pytest.fixture
def corpus(tmp_path, small_text):
    p = tmp_path / "corpus.txt"
    p.write_text(small_text[:30_000])
    return p


def test_private_pretraining_account_equals_opacus_and_learns(tmp_path, corpus):
    from opacus.accountants import RDPAccountant

    result = pretrain(dp_recipe(tmp_path, corpus, {"noise_multiplier": 0.05, "delta": 1e-6}))
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert report["steps"] == 8 == result.steps and report["record"] == "window of 25 tokens"
    assert report["sample_rate"] == pytest.approx(6 / report["records"])
    acc = RDPAccountant()
    acc.history = [(report["noise_multiplier"], report["sample_rate"], report["steps"])]
    assert report["epsilon"] == pytest.approx(acc.get_epsilon(1e-6), rel=1e-9)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "epsilon" in r]
    assert len(steps) == 8 and all(r["epsilon"] > 0 for r in steps)
    assert steps == sorted(steps, key=lambda r: r["epsilon"])  # spent, never refunded
    # little noise: the private run learns (validation loss falls)
    assert result.val_losses[-1][1] < result.val_losses[0][1] - 0.1, result.val_losses
    # the output is an ordinary model directory
    from seekformer.models.causal_lm import SeekForCausalLM

    SeekForCausalLM.from_pretrained(tmp_path / "run")


def test_the_noisy_gradient_is_the_clipped_sum_plus_calibrated_noise():
    p = PrivacyRecipe(epsilon=3.0, delta=1e-5)
    dp = DPSGD(p, n=1000, expected_batch=50, planned_steps=20, moe_layers=[], top_k=2, seed=7)
    assert dp.steps == 20 and dp.sigma_grad == dp.account.noise_multiplier
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    sums = [torch.randn(3, 4), torch.randn(5)]
    gen = torch.Generator().manual_seed(7 + 1_000_003)  # the mechanism's own generator, replayed
    dp.privatize(params, sums, None)
    for param, s in zip(params, sums):
        noise = torch.normal(0.0, dp.sigma_grad * p.max_grad_norm, s.shape, generator=gen)
        assert torch.allclose(param.grad, (s + noise) / 50.0)
    dp.spend()
    # 20 planned steps at the calibrated noise spend the budget, not more
    for _ in range(19):
        dp.spend()
    assert dp.epsilon == pytest.approx(3.0, rel=0.02) and dp.epsilon <= 3.0 + 1e-9


def test_noise_multiplier_with_a_budget_shortens_the_run(tmp_path, corpus):
    result = pretrain(dp_recipe(tmp_path, corpus, {"noise_multiplier": 1.0, "epsilon": 1.25, "delta": 1e-6},
                                steps=50, eval_every=0))
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert 1 < result.steps == report["steps"] < 50 and report["epsilon"] <= 1.25


@pytest.mark.parametrize("override, fragment", [
    (["--privacy.epsilon", "-1", "--privacy.delta", "1e-6"], "privacy.epsilon must be > 0"),
    (["--privacy.epsilon", "8"], "privacy.delta is required"),
    (["--privacy.epsilon", "8", "--privacy.delta", "0.5"], "must be below 1/n"),
    (["--privacy.epsilon", "8", "--privacy.delta", "1e-6", "--train.grad_accum", "2"], "grad_accum must be 1"),
    (["--privacy.epsilon", "8", "--privacy.delta", "1e-6", "--parallel.expert_parallel", "2"], "one process"),
    (["--privacy.epsilon", "8", "--privacy.delta", "1e-6", "--resume"], "resume is not supported"),
    (["--privacy.epsilon", "8", "--privacy.delta", "1e-6", "--privacy.accountant", "gdp"], "unknown privacy.accountant"),
])
def test_bad_private_pretraining_settings_are_one_line_errors(tmp_path, corpus, capsys, override, fragment):
    import yaml

    from seekformer.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dp_recipe(tmp_path, corpus, None).to_dict()))
    if fragment != "must be below 1/n":
        user_error(capsys, ["pretrain", str(recipe), *override], fragment)
        return
    # delta against the number of windows: known once the text is tokenized (progress lines come first)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["pretrain", str(recipe), *override])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and fragment in err.strip().splitlines()[-1], err


def test_privacy_section_refuses_unknown_keys(tmp_path, corpus):
    with pytest.raises(RecipeError, match="privacy.epsilom"):
        dp_recipe(tmp_path, corpus, {"epsilom": 8})
