"""Distributed training on this CPU (gloo, 2 processes): parity with 1 process, resharding resume, EP dispatch.

The runs go through the real command line (`torchrun -m seekformer pretrain` and `seekformer pretrain
--nproc 2`) on a tiny MoE with MTP, the sequence-wise balance loss and aux-loss-free balancing, 20 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seekformer.distributed import ParallelRecipe, check_parallel
from seekformer.errors import RecipeError

from .conftest import tiny_config

STEPS = 20
MODEL = dict(vocab_size=384, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
             first_k_dense_replace=1, num_nextn_predict_layers=1, seq_aux_loss_alpha=0.001,
             max_position_embeddings=128)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1-process run and 2-process DDP / FSDP2 / FSDP2 + 2-way EP runs of the same recipe."""
    import yaml

    from seekformer.data.builtin import read_corpus_documents

    root = tmp_path_factory.mktemp("dist")
    docs, size = [], 0
    for d in read_corpus_documents():
        docs.append(d[:20000])
        size += len(docs[-1])
        if size > 150_000:
            break
    (root / "text.txt").write_text("\n\n".join(docs))
    recipe = {"model": MODEL, "tokenizer": {"vocab_size": 384},
              "data": {"sources": [str(root / "text.txt")], "val_fraction": 0.05, "cache_dir": str(root / "data")},
              "train": {"steps": STEPS, "seq_len": 64, "batch_size": 8, "lr": 0.003, "warmup_steps": 2,
                        "eval_every": 0, "eval_batches": 2, "save_every": 10, "keep_checkpoints": 3,
                        "log_every": 1, "progress": False, "threads": 1}}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = _env()

    def run(name: str, nproc: int, *args: str, torchrun: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "seekformer", "pretrain", str(root / "r.yaml"), "--train.out", str(root / name),
               *args]
        if nproc > 1 and torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(_port()), *cmd[1:]]
        elif nproc > 1:
            cmd += ["--nproc", str(nproc)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    out = {"root": root, "run": run}
    for name, nproc, args, via_torchrun in [("one", 1, (), True), ("ddp", 2, (), False),
                                            ("fsdp", 2, ("--parallel.strategy", "fsdp"), True),
                                            ("fsdp_ep", 2, ("--parallel.strategy", "fsdp",
                                                            "--parallel.expert_parallel", "2"), True)]:
        p = run(name, nproc, *args, torchrun=via_torchrun)
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = _losses(root / name)
    return out


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp_ep"])
def test_two_processes_give_the_one_process_loss_at_every_step(runs, name):
    one, two = runs["one"], runs[name]
    assert len(one) == len(two) == STEPS
    assert one[-1] < one[0] - 0.5  # it trains
    diffs = [abs(a - b) for a, b in zip(one, two)]
    assert max(diffs) < 1e-5, diffs


def _resume_from(runs, src: str, dst: str, nproc: int, *args: str) -> list[float]:
    root = runs["root"]
    (root / dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / src / "checkpoints" / "step-000010", root / dst / "checkpoints" / "step-000010")
    (root / dst / "checkpoints" / "latest").write_text("step-000010\n")
    p = runs["run"](dst, nproc, "--resume", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    return _losses(root / dst)


def test_checkpoint_of_two_processes_resumes_on_one(runs):
    resumed = _resume_from(runs, "fsdp_ep", "two_to_one", 1)
    assert len(resumed) == STEPS - 10
    assert max(abs(a - b) for a, b in zip(resumed, runs["one"][10:])) < 1e-5


def test_checkpoint_of_one_process_resumes_on_two(runs):
    resumed = _resume_from(runs, "one", "one_to_two", 2, "--parallel.strategy", "fsdp",
                           "--parallel.expert_parallel", "2")
    assert len(resumed) == STEPS - 10
    assert max(abs(a - b) for a, b in zip(resumed, runs["one"][10:])) < 1e-5


def test_distributed_model_dir_loads_in_transformers(runs):
    transformers = pytest.importorskip("transformers")
    from seekformer import SeekForCausalLM

    out = runs["root"] / "fsdp_ep"
    ours = SeekForCausalLM.from_pretrained(out).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max()
    assert diff < 1e-4
    one = SeekForCausalLM.from_pretrained(runs["root"] / "one").eval()
    with torch.no_grad():
        assert (ours(ids).logits - one(ids).logits).abs().max() < 1e-3  # the same training, to rounding


# ---------------------------------------------------------------------- expert-parallel dispatch alone
def _ep_worker(rank: int, world: int, init: str, result: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from seekformer.distributed.expert_parallel import ExpertParallelExperts
    from seekformer.nn.moe import Experts, MoE

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1)
        torch.manual_seed(0)
        moe = MoE(cfg)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.2)
        # each rank its own tokens (uneven counts); the reference is ONE process dispatching all of them
        xs = [torch.randn(13 + 5 * r, cfg.hidden_size, generator=torch.Generator().manual_seed(100 + r))
              for r in range(world)]
        everything = torch.cat(xs)
        routing_all = moe.gate(everything)
        local_all = moe.experts(everything, routing_all.indices, routing_all.weights)
        lo = sum(len(v) for v in xs[:rank])
        x, local = xs[rank], local_all[lo:lo + len(xs[rank])]
        routing = moe.gate(x)
        ep = ExpertParallelExperts(moe.experts, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
        x_ep = x.clone().requires_grad_(True)
        y = ep(x_ep, routing.indices, routing.weights)
        y.square().sum().backward()
        traffic = dict(ep.traffic)
        # an Experts like any other: expert_forward on this rank's experts is the full module's
        mine = range(ep.first_expert, ep.first_expert + ep.num_local)
        with torch.no_grad():
            same_expert = isinstance(ep, Experts) and all(
                torch.equal(ep.expert_forward(e, x[:3]), moe.experts.expert_forward(e, x[:3])) for e in mine)
        result[rank] = {"same_expert_forward": same_expert, "traffic": traffic, "k": cfg.num_experts_per_tok, "d": cfg.hidden_size,
                        "max_diff": float((y - local).abs().max().detach()), "exact": bool(torch.equal(y, local)),
                        "grad_ok": bool(x_ep.grad is not None and torch.isfinite(x_ep.grad).all())}
    finally:
        dist.destroy_process_group()


def test_expert_parallel_dispatch_equals_local_dispatch(tmp_path):
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_ep_worker, args=(2, f"file://{tmp_path}/store", result), nprocs=2, join=True)
        res = dict(result)
    for rank in (0, 1):
        assert res[rank]["grad_ok"] and res[rank]["same_expert_forward"]
        # each expert sees the same rows in the same order (source rank, then token) as one process
        # dispatching all ranks' tokens: the same kernels on the same blocks, bit-identical outputs
        assert res[rank]["exact"], res
        # traffic per token per layer: k rows of D+1 floats out (gate weight column) and k rows of D back,
        # i.e. the 2*k*hidden*dtype of the formula plus k*4 bytes
        t, k, d = res[rank]["traffic"], res[rank]["k"], res[rank]["d"]
        assert t["bytes"] == t["tokens"] * (k * (d + 1) * 4 + k * d * 4)
        assert 0 < t["remote_bytes"] < t["bytes"]


# ---------------------------------------------------------------------- bad input
def test_parallel_settings_are_checked_before_any_process_group():
    ok = ParallelRecipe(strategy="fsdp", expert_parallel=2)
    check_parallel(ok, world_size=2, batch_size=8, n_routed_experts=8)
    with pytest.raises(RecipeError, match="strategy"):
        check_parallel(ParallelRecipe(strategy="zero3"), 2, 8, 8)
    with pytest.raises(RecipeError, match="divide the number of processes"):
        check_parallel(ParallelRecipe(expert_parallel=3), 2, 8, 8)
    with pytest.raises(RecipeError, match="n_routed_experts"):
        check_parallel(ParallelRecipe(expert_parallel=4), 4, 8, 6)
    with pytest.raises(RecipeError, match="does not split"):
        check_parallel(ParallelRecipe(), 2, 7, 8)
    with pytest.raises(RecipeError, match="divide the number of processes"):
        check_parallel(ParallelRecipe(expert_parallel=2), 1, 8, 8)  # EP on one process


@pytest.mark.parametrize("args, needle", [(["--parallel.strategy", "zero3"], "parallel.strategy"),
                                          (["--parallel.expert_parallel", "3"], "expert_parallel"),
                                          (["--train.batch_size", "7"], "does not split")])
def test_bad_parallel_recipe_is_one_line_and_exit_2(tmp_path, args, needle):
    cmd = [sys.executable, "-m", "seekformer", "pretrain", "tiny", "--train.out", str(tmp_path / "o"), "--nproc", "2",
           *args]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_bad_recipe_under_torchrun_exits_2_on_every_rank_without_hanging(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "seekformer", "pretrain", "tiny", "--train.out", str(tmp_path / "o"), "--parallel.expert_parallel",
           "3"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert p.stderr.count("error: parallel.expert_parallel=3") == 1, p.stderr  # rank 0 only
    assert "exitcode  : 2" in p.stderr or "exit code 2" in p.stderr.lower() or "exitcode: 2" in p.stderr, p.stderr


def test_activation_checkpointing_changes_nothing_but_memory():
    from seekformer import SeekForCausalLM
    from seekformer.distributed import Parallel

    def train(ac: bool) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = SeekForCausalLM(tiny_config(num_nextn_predict_layers=1, seq_aux_loss_alpha=1e-3)).train()
        Parallel.single(ParallelRecipe(activation_checkpointing=ac)).wrap(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(3):
            opt.zero_grad()
            out = model(ids, labels=ids)
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss))
        return losses, torch.stack([m.load_counts for _, m in model.moe_layers()])

    (plain, loads_plain), (ac, loads_ac) = train(False), train(True)
    assert plain == ac
    assert torch.equal(loads_plain, loads_ac)  # recomputation in backward does not count tokens twice
