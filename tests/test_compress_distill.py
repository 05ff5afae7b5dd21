"""Distillation (compress/distill.py) and pruning's merge / recovery options (compress/prune.py)."""

from __future__ import annotations

import json

import pytest
import torch

from seekformer.cli import main
from seekformer.compress.distill import kd_kl
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.serving.demo import build_demo_model_dir

DEMO = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, v_head_dim=16)
FAST = ["--set", "num_hidden_layers=2"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return build_demo_model_dir(tmp_path_factory.mktemp("teacher"), n_routed_experts=8, n_group=2, topk_group=2,
                                num_hidden_layers=3, **DEMO)


@pytest.fixture
def text_file(tmp_path, small_text):
    p = tmp_path / "text.txt"
    p.write_text(small_text)
    return p


def _records(run_dir, key):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _distill(teacher_dir, text_file, out, steps, *extra):
    main(["compress", "distill", str(teacher_dir), "--student", str(teacher_dir / "config.json"), *FAST,
          "--data", str(text_file), "--steps", str(steps), "--lr", "3e-3", "--seed", "0", "--threads", "1",
          "--seq-len", "64", "--batch-size", "4", *extra, "--out", str(out)])


def _train_flags():
    # a small, fast batch shape for the tiny demo models (the teacher has no recipe.yaml, so defaults apply)
    return ["--set", "num_nextn_predict_layers=0"]


def test_distill_student_kl_to_teacher_falls(teacher_dir, text_file, tmp_path):
    """The student's KL to the teacher, on held-out windows, falls over training; the run directory is a
    normal model directory plus checkpoints, metrics and distill.json."""
    out = tmp_path / "student"
    _distill(teacher_dir, text_file, out, 24, "--kd-weight", "1.0", "--hidden-weight", "0.5", *_train_flags())
    kl = _records(out, "kd_kl")
    assert len(kl) >= 2
    info = json.loads((out / "distill.json").read_text())
    assert info["kd_weight"] == 1.0 and info["steps"] == 24
    student = SeekForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    teacher = SeekForCausalLM.from_pretrained(teacher_dir).eval()
    fresh = SeekForCausalLM(student.config)
    fresh.reset_parameters(seed=0)
    from seekformer.tokenizer import SeekTokenizer

    ids = torch.tensor([SeekTokenizer.load(teacher_dir).encode(text_file.read_text()[-4000:])[:128]])
    with torch.no_grad():
        t = teacher(ids).logits
        before, after = float(kd_kl(fresh.eval()(ids).logits, t)), float(kd_kl(student.eval()(ids).logits, t))
    assert after < 0.8 * before, (before, after)
    assert _records(out, "hidden_mse")[-1][1] < _records(out, "hidden_mse")[0][1]


def test_distill_resume_is_exact(teacher_dir, text_file, tmp_path):
    """Resuming from the step-4 checkpoint of an 8-step run gives the same losses at steps 5-8 (with the
    hidden-state projection, whose weights and optimizer state ride in the trainer state)."""
    import shutil

    flags = ["--kd-weight", "0.5", "--temperature", "2", "--hidden-weight", "0.1", *_train_flags()]
    a, b = tmp_path / "a", tmp_path / "b"
    _distill(teacher_dir, text_file, a, 8, *flags)
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-000008")
    (b / "checkpoints" / "latest").write_text("step-000004\n")
    _distill(teacher_dir, text_file, b, 8, *flags, "--resume")
    la, lb = dict(_records(a, "loss")), dict(_records(b, "loss"))
    for step in (5, 8):
        assert la[step] == pytest.approx(lb[step], rel=1e-5, abs=1e-6)
    with pytest.raises(SystemExit) as e:  # other distillation settings cannot resume this run
        _distill(teacher_dir, text_file, b, 8, "--kd-weight", "0.2", *_train_flags(), "--resume")
    assert e.value.code == 2


def test_distill_bad_input(teacher_dir, text_file, tmp_path, capsys):
    other = tmp_path / "other.json"
    cfg = json.loads((teacher_dir / "config.json").read_text())
    other.write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 64}))
    for student, extra, needle in [(str(other), [], "vocabulary"), ("nope", [], "--student"),
                                   (str(teacher_dir / "config.json"), ["--kd-weight", "1.5"], "--kd-weight")]:
        out = tmp_path / "x"
        with pytest.raises(SystemExit) as e:
            main(["compress", "distill", str(teacher_dir), "--student", student, "--data", str(text_file),
                  "--steps", "2", *extra, "--out", str(out)])
        assert e.value.code == 2 and needle in capsys.readouterr().err
        assert not (out / "config.json").exists()


# ====================================================================== pruning: merge, recovery
def test_merge_averages_aligned_experts_by_frequency():
    """A dropped expert that is a neuron-permuted copy of a kept one is recognised (router rows alike), aligned
    and averaged by routing frequency: the kept expert's function is unchanged; dissimilar ones stay apart."""
    from seekformer.compress.prune import merge_experts
    from seekformer.nn.moe import MoE

    from .conftest import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(n_group=1, topk_group=1, n_routed_experts=4)
    moe = MoE(cfg)
    ex = moe.experts
    f = cfg.moe_intermediate_size
    perm = torch.randperm(f)
    with torch.no_grad():
        for p_ in (ex.gate_up_proj, ex.down_proj, moe.gate.weight):  # a module's parameters start uninitialised
            p_.copy_(torch.randn_like(p_) * 0.1)
        ex.gate_up_proj[3] = torch.cat([ex.gate_up_proj[0][:f][perm], ex.gate_up_proj[0][f:][perm]])
        ex.down_proj[3] = ex.down_proj[0][:, perm]
        moe.gate.weight[3] = moe.gate.weight[0] * 1.01 + 1e-3
        x = torch.randn(5, cfg.hidden_size)
        before = ex.expert_forward(0, x)
        other = ex.expert_forward(1, x)
        into = merge_experts(moe, kept=[0, 1], freq=[30.0, 10.0, 5.0, 10.0])
        assert 3 in into[0]
        assert torch.allclose(ex.expert_forward(0, x), before, atol=1e-5)  # 30:10 mix of equal functions
        if into.get(1):  # expert 2 was folded into 1: 10:5 average of two different experts
            assert not torch.allclose(ex.expert_forward(1, x), other, atol=1e-4)


def test_prune_merge_and_recover(teacher_dir, text_file, tmp_path):
    """--merge records what was folded where; --recover-steps fine-tunes the pruned model by distillation from
    the unpruned one and the validation loss falls; the output is a normal model directory."""
    out = tmp_path / "pruned"
    main(["compress", "prune", str(teacher_dir), "--keep", "0.5", "--calibration", str(text_file),
          "--max-tokens", "600", "--merge", "--recover-steps", "6", "--recover-lr", "3e-3", "--out", str(out)])
    stats = json.loads((out / "prune_stats.json").read_text())
    assert stats["merge"] and stats["n_routed_experts"] == 4
    merged = stats["merged_into"]["model.layers.1.mlp"]
    assert sorted(d for ds in merged.values() for d in ds) == sorted(
        set(range(8)) - set(stats["kept"]["model.layers.1.mlp"]))
    rec = stats["recovery"]
    assert rec["steps"] == 6 and rec["val_loss_after"] < rec["val_loss_before"]
    m = SeekForCausalLM.from_pretrained(out)
    assert m.config.n_routed_experts == 4
    assert (out / "expert_usage.png").is_file() and not (out / "checkpoints").exists()
