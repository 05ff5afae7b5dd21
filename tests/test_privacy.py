"""DP-SGD: the plain-autograd seam, per-example gradients, the account (against Opacus), `seekformer finetune`
with a `privacy:` section, and one-line errors for bad privacy settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from seekformer.cli import main
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.models.multitask import SeekForMultiTask
from seekformer.nn.plain import enabled, plain_autograd
from seekformer.training.privacy.accounting import (PrivacyAccount, calibrate, effective_noise, epsilon_of,
                                                    max_steps, split_noise)
from seekformer.training.privacy.per_sample import PerSampleClipper, clip_factor, trim

from .conftest import tiny_config
from .test_finetune_cli import user_error, write_jsonl
from .test_multitask import make_tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("priv") / "base")


def test_plain_autograd_matches_the_fast_paths():
    """Same loss and gradients with and without the seam (RMSNorm, fused cross-entropy, grouped experts)."""
    torch.manual_seed(0)
    lm = SeekForCausalLM(tiny_config(seq_aux_loss_alpha=0.0))
    lm.reset_parameters(seed=0)
    lm.train()
    ids = torch.randint(3, 256, (2, 12))

    def run(plain: bool):
        lm.zero_grad(set_to_none=True)
        with plain_autograd(plain):
            assert enabled() == plain
            out = lm(ids, labels=ids)
            out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    loss_fast, g_fast = run(False)
    loss_plain, g_plain = run(True)
    assert not enabled()
    assert torch.allclose(loss_fast, loss_plain, atol=1e-5)
    assert g_fast.keys() == g_plain.keys() and len(g_fast) > 10
    for n in g_fast:
        assert torch.allclose(g_fast[n], g_plain[n], atol=1e-5, rtol=1e-4), n


def _model_and_batch(base):
    from seekformer.data.tasks import collate
    from seekformer.tokenizer import SeekTokenizer

    tok = SeekTokenizer.load(base)
    lm = SeekForCausalLM.from_pretrained(base)
    lm.config.seq_aux_loss_alpha = 0.0  # the balance loss is a per-batch mean, not a sum over examples
    for m in lm.modules():
        if hasattr(m, "seq_aux_loss_alpha"):
            m.seq_aux_loss_alpha = 0.0
    model = SeekForMultiTask(lm, [{"name": "c", "type": "classification", "labels": ["a", "b"], "dropout": 0.0}])
    model.train()
    texts = ["the cat sat on the mat", "stocks fell", "a long sentence about nothing in particular at all", "hi"]
    examples = [{"input_ids": tok.encode(t), "label": i % 2} for i, t in enumerate(texts)]
    return model, collate(examples, "classification", tok.pad_token_id)


def _vmap_loss(model):
    def loss(b):
        hidden = model.lm.model(b["input_ids"])
        aux = model._aux_loss()
        logits = model.heads["c"](hidden, b["attention_mask"])
        out = torch.nn.functional.cross_entropy(logits.float(), b["labels"])
        return out + aux if aux is not None else out
    return loss


def _reference(model, batch, params, moe, loss_of, c):
    """sum_i clip(g_i), summed load fractions and norms from one backward pass per example (its padded row,
    masked: an independent path)."""
    ref, norms = [torch.zeros_like(p) for p in params], []
    ref_loads = torch.zeros(len(moe), moe[0].num_experts)
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i: i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        for m in moe:
            m.load_counts.zero_()
        loss_of(one).backward()
        g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum((x ** 2).sum() for x in g))
        norms.append(float(norm))
        for r, x in zip(ref, g):
            r += x * clip_factor(norm, c)
        ref_loads += torch.stack([m.load_counts.clone() for m in moe]) / one["attention_mask"].sum()
    model.zero_grad(set_to_none=True)
    for m in moe:
        m.load_counts.zero_()
    return ref, ref_loads, norms


def test_per_sample_gradients_match_per_example_backward(base):
    """loop and vmap clipped sums equal sum_i clip(g_i) with g_i from separate backward passes (padded
    batch, masks), and the summed load fractions match the MoE layers' own counts."""
    model, batch = _model_and_batch(base)
    params = [p for p in model.parameters() if p.requires_grad and p.grad is None]
    moe = [m for _, m in model.lm.moe_layers()]
    loss_of = lambda b: model("c", **b).loss  # noqa: E731
    c = 0.05
    ref, ref_loads, norms = _reference(model, batch, params, moe, loss_of, c)
    assert min(norms) > c  # every example is clipped: the test sees clipping, not just sums
    for strategy in ("loop", "vmap"):
        clipper = PerSampleClipper(model, params, c, moe, strategy, _vmap_loss(model), chunk_size=3)
        total, loads, stats = clipper.clipped_sum(batch, loss_of)
        assert clipper.strategy == strategy and stats["examples"] == 4 and stats["clipped_fraction"] == 1.0
        for n_, (a, b) in enumerate(zip(total, ref)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-3), (strategy, n_, (a - b).abs().max())
        assert torch.allclose(loads, ref_loads, atol=1e-5), strategy
        assert all(p.grad is None for p in params)


def test_hooks_per_sample_gradients_of_lora_match_per_example_backward(base):
    """The batched `hooks` rules (LoRA on attention, on the dense/shared MLP weights and on the stacked routed
    experts, the task head) give the same clipped sums as separate backward passes, with the sequence-wise
    balance loss on (it is a mean over sequences, so B * batch loss is the sum of the examples' losses)."""
    model, batch = _model_and_batch(base)
    model.lm.config.seq_aux_loss_alpha = 1e-2
    model.add_lora(r=4, alpha=8.0)
    torch.manual_seed(1)
    for n, p in model.named_parameters():  # peft zero-initialises B: make every factor's gradient non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in names) and any("q_proj" in n or "kv" in n for n in names)
    moe = [m for n_, m in model.lm.moe_layers() if not n_.startswith("mtp.")]
    def loss_of(b):
        out = model("c", **b)
        assert out.aux_loss is not None
        return out.loss + out.aux_loss
    c = 0.02
    ref, ref_loads, norms = _reference(model, batch, params, moe, loss_of, c)
    assert min(norms) > c
    clipper = PerSampleClipper(model, params, c, moe, "hooks", loss_sums_examples=True)
    total, loads, stats = clipper.clipped_sum(batch, loss_of)
    assert clipper.strategy == "hooks" and stats["examples"] == 4 and stats["clipped_fraction"] == 1.0
    assert stats["grad_norm_median"] == pytest.approx(float(torch.tensor(norms).median()), rel=1e-4)
    for n_, a, b in zip(names, total, ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), (n_, (a - b).abs().max())
    assert torch.allclose(loads, ref_loads, atol=1e-5)
    assert all(p.grad is None for p in params)
    assert all(m.experts.get_base_layer().row_tap is None for m in moe)


def test_hooks_per_sample_gradients_of_full_fine_tuning_match(base):
    """Full fine-tuning through the hooks rules (embeddings, RMSNorm weights, attention Linears, the router,
    the stacked experts' own weights, the shared and dense MLPs, the head) equals per-example backward."""
    model, batch = _model_and_batch(base)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    moe = [m for n_, m in model.lm.moe_layers() if not n_.startswith("mtp.")]
    loss_of = lambda b: model("c", **b).loss  # noqa: E731
    ref, ref_loads, norms = _reference(model, batch, params, moe, loss_of, 0.5)
    clipper = PerSampleClipper(model, params, 0.5, moe, "hooks", loss_sums_examples=True, chunk_size=3)
    total, loads, stats = clipper.clipped_sum(batch, loss_of)
    assert clipper.strategy == "hooks" and stats["examples"] == 4
    for n_, a, b in zip(names, total, ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), (n_, (a - b).abs().max())
    assert torch.allclose(loads, ref_loads, atol=1e-5)


def test_hooks_refuse_a_weight_used_outside_the_rules(base):
    """A weight read outside its layer's forward (here a hook adding 0.5 * proj(x) again) makes the examples'
    gradients disagree with autograd's batch gradient: `hooks` refuses with one line, `auto` falls back."""
    from seekformer.errors import RecipeError

    model, batch = _model_and_batch(base)
    proj = model.heads["c"].proj
    handle = proj.register_forward_hook(lambda mod, inp, out: out + 0.5 * torch.nn.functional.linear(inp[0], mod.weight))
    params = [p for p in model.parameters() if p.requires_grad]
    moe = [m for _, m in model.lm.moe_layers()]
    loss_of = lambda b: model("c", **b).loss  # noqa: E731
    with pytest.raises(RecipeError, match="per_sample hooks cannot run .*heads.c.proj.weight do not add up"):
        PerSampleClipper(model, params, 1.0, moe, "hooks", loss_sums_examples=True).clipped_sum(batch, loss_of)
    clipper = PerSampleClipper(model, params, 1.0, moe, "auto", loss_sums_examples=True, chunk_size=1)
    assert clipper.strategy == "hooks"  # the tiny model's full gradient is small enough for auto
    clipper.clipped_sum(batch, loss_of)
    assert clipper.strategy == "loop" and clipper.fallback_reason.startswith("hooks: the per-example gradients")
    handle.remove()


def test_trim_cuts_padding():
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
             "labels": torch.tensor([0, 1])}
    one = trim(batch, 1)
    assert one["input_ids"].tolist() == [[8]] and one["labels"].tolist() == [1]


def test_account_equals_opacus():
    from opacus.accountants import PRVAccountant, RDPAccountant

    for kind, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        ref = cls()
        acc = PrivacyAccount(kind, 1e-5, 0.9, 0.05)
        for _ in range(40):
            ref.step(noise_multiplier=0.9, sample_rate=0.05)
            acc.step()
        assert acc.epsilon == pytest.approx(ref.get_epsilon(1e-5), rel=1e-6)
    sigma = calibrate("rdp", 3.0, 1e-5, 0.05, 100)
    assert 2.9 < epsilon_of("rdp", sigma, 0.05, 100, 1e-5) <= 3.0
    n = max_steps("rdp", 3.0, 1e-5, sigma, 0.05, 500)
    assert 100 <= n < 500 and epsilon_of("rdp", sigma, 0.05, n + 1, 1e-5) > 3.0


def test_noise_split_composes_to_the_charged_multiplier():
    for share in (0.05, 0.3):
        g, c = split_noise(1.2, share)
        assert g > 1.2 and c > g and effective_noise(g, c) == pytest.approx(1.2)
        # the composed mechanism: blocks rescaled to unit noise have sensitivity sqrt(g^-2 + c^-2) = 1/sigma
        assert math.hypot(1 / g, 1 / c) == pytest.approx(1 / 1.2)
    assert split_noise(1.2, 0.0) == (1.2, None) and effective_noise(1.2, None) == 1.2


ROWS = [{"text": f"the cat sat on mat {i}", "label": "pets"} if i % 2 else
        {"text": f"stocks fell by {i} points", "label": "money"} for i in range(40)]


def _recipe(tmp_path, base, method, privacy, steps=3):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:8])
    p = tmp_path / f"{method}.yaml"
    p.write_text(json.dumps({"base": base, "out": str(tmp_path / method),
                             "tasks": [{"name": "topic", "type": "classification", "train": train, "test": test}],
                             "train": {"steps": steps, "batch_size": 8, "method": method, "progress": False,
                                       "log_every": 1}, "privacy": privacy}))
    return str(p)


@pytest.mark.parametrize("method", ["full", "lora", "frozen"])
def test_finetune_with_privacy_writes_the_account(base, tmp_path, method):
    main(["finetune", _recipe(tmp_path, base, method, {"epsilon": 2.0, "delta": 1e-3})])
    out = tmp_path / method
    acct = json.loads((out / "privacy.json").read_text())
    assert set(acct) >= {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant", "max_grad_norm"}
    assert acct["steps"] == 3 and acct["sample_rate"] == pytest.approx(8 / 40) and acct["accountant"] == "rdp"
    assert 1.9 < acct["epsilon"] <= 2.0
    assert acct["epsilon"] == pytest.approx(epsilon_of("rdp", acct["noise_multiplier"], 0.2, 3, 1e-3), rel=1e-9)
    assert acct["moe_balancing"] == (method == "full")
    if method == "full":
        assert acct["count_noise_multiplier"] > acct["grad_noise_multiplier"] > acct["noise_multiplier"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in logged if "epsilon" in r]
    assert len(eps) == 3 and eps == sorted(eps) and eps[-1] == pytest.approx(acct["epsilon"])
    assert (out / "heads.safetensors").is_file() and "test" in json.loads((out / "results.json").read_text())


def test_dp_defaults_fill_what_the_recipe_leaves_unset():
    """A privacy recipe that sets nothing trains a head on every depth of the frozen trunk and the bag of tokens (the measured
    default); choosing lora or full brings the adapting defaults; keys the recipe sets are kept."""
    from seekformer.training.multitask_recipe import finetune_recipe_from_dict
    from seekformer.training.privacy.recipe import DP_ADAPT_DEFAULTS, DP_TRAIN_DEFAULTS

    task = {"name": "t", "type": "classification", "train": "x.jsonl"}
    r = finetune_recipe_from_dict({"base": "b", "tasks": [task], "privacy": {"epsilon": 8, "delta": 1e-5}})
    assert (r.train.method, r.train.batch_size, r.train.steps) == ("frozen", DP_TRAIN_DEFAULTS["batch_size"],
                                                                   DP_TRAIN_DEFAULTS["steps"])
    assert (r.tasks[0].features, r.tasks[0].pooling, r.tasks[0].dropout) == ("layers+tokens", "mean", 0.0)
    r = finetune_recipe_from_dict({"base": "b", "tasks": [{**task, "pooling": "last"}], "train": {"method": "lora",
                                   "steps": 7}, "privacy": {"epsilon": 8, "delta": 1e-5}})
    assert (r.train.batch_size, r.train.lr, r.train.steps) == (DP_ADAPT_DEFAULTS["batch_size"], DP_ADAPT_DEFAULTS["lr"], 7)
    assert (r.tasks[0].features, r.tasks[0].pooling) == ("layers+tokens", "last")
    r = finetune_recipe_from_dict({"base": "b", "tasks": [task]})
    assert (r.train.method, r.tasks[0].features) == ("full", "final")
    r = finetune_recipe_from_dict({"base": "b", "tasks": [task], "federated": {"clients": 2}})
    assert (r.train.method, r.tasks[0].features, r.tasks[0].pooling) == ("full", "layers+tokens", "mean")


def test_default_expected_batch_shrinks_to_small_data(base, tmp_path):
    """The default expected batch (512) is for ~1,000+ examples: on 40 it becomes 20 (q = 1/2) instead of an
    error; a batch the recipe sets is kept (and more than the data is a one-line error)."""
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    p = tmp_path / "dp.yaml"
    p.write_text(json.dumps({"base": base, "out": str(tmp_path / "out"),
                             "tasks": [{"name": "topic", "type": "classification", "train": train}],
                             "train": {"steps": 2, "progress": False}, "privacy": {"epsilon": 8, "delta": 1e-3}}))
    main(["finetune", str(p)])
    acct = json.loads((tmp_path / "out" / "privacy.json").read_text())
    assert acct["expected_batch_size"] == 20 and acct["sample_rate"] == pytest.approx(0.5)
    with pytest.raises(SystemExit) as e:
        main(["finetune", str(p), "--train.batch_size", "64", "--out", str(tmp_path / "out2")])
    assert e.value.code == 2


def test_noise_multiplier_given_stops_at_the_budget(base, tmp_path):
    main(["finetune", _recipe(tmp_path, base, "frozen", {"epsilon": 1.0, "delta": 1e-3, "noise_multiplier": 2.0},
                              steps=50)])
    acct = json.loads((tmp_path / "frozen" / "privacy.json").read_text())
    assert acct["steps"] < 50 and acct["epsilon"] <= 1.0
    assert epsilon_of("rdp", 2.0, 0.2, acct["steps"] + 1, 1e-3) > 1.0


@pytest.mark.parametrize("privacy,fragment", [
    ({"epsilon": 0, "delta": 1e-5}, "epsilon must be > 0"),
    ({"epsilon": -1, "delta": 1e-5}, "epsilon must be > 0"),
    ({"epsilon": 8, "delta": 0.05}, "must be below 1/n"),
    ({"epsilon": 8}, "delta is required"),
    ({"epsilon": 8, "delta": 1e-5, "accountant": "gdp"}, "unknown privacy.accountant"),
    ({"epsilon": 8, "delta": 1e-5, "colour": 1}, "unknown recipe key 'privacy.colour'"),
])
def test_bad_privacy_settings_are_one_line_errors(base, tmp_path, capsys, privacy, fragment):
    user_error(capsys, ["finetune", _recipe(tmp_path, base, "frozen", privacy)], fragment)


def test_vmap_through_expert_adapters_is_a_one_line_error(base, tmp_path, capsys):
    """Found at the first step (after the run's own start-up lines): exit 2, the error in one line, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(["finetune", _recipe(tmp_path, base, "lora", {"epsilon": 2.0, "delta": 1e-3, "per_sample": "vmap"})])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "per_sample vmap" in err.strip().splitlines()[-1]
