"""DeepSeekMoE routing invariants (hypothesis) and expert dispatch against a naive dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from seekformer.nn.moe import Experts, MoE, Router

from .conftest import tiny_config

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])



@st.composite
def routing_cases(draw):
    """A router configuration (V3 noaux_tc, or V2 greedy / group-limited greedy) and a seed."""
    kind = draw(st.sampled_from(["noaux_tc", "greedy", "group_limited_greedy"]))
    e = draw(st.sampled_from([4, 6, 8, 12, 16]))
    groups = [g for g in range(1, e + 1) if e % g == 0 and (kind != "noaux_tc" or e // g >= 2)]
    n_group = 1 if kind == "greedy" else draw(st.sampled_from(groups))
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, topk_group * (e // n_group) if kind != "greedy" else e))
    return dict(
        model_type="deepseek_v3" if kind == "noaux_tc" else "deepseek_v2",
        scoring_func="sigmoid" if kind == "noaux_tc" else "softmax", topk_method=kind,
        n_routed_experts=e, n_group=n_group, topk_group=topk_group, num_experts_per_tok=k,
        norm_topk_prob=draw(st.booleans()), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0])),
        first_k_dense_replace=0,
    ), draw(st.integers(0, 2**31 - 1)), draw(st.integers(1, 48))


@SETTINGS
@given(routing_cases())
def test_router_invariants(case):
    overrides, seed, n = case
    cfg = tiny_config(**overrides)
    gen = torch.Generator().manual_seed(seed)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        router.e_score_correction_bias.copy_(0.3 * torch.randn(cfg.n_routed_experts, generator=gen))
    x = torch.randn(n, cfg.hidden_size, generator=gen)
    r = router(x)
    e, k, g = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group

    # each token gets exactly K distinct, valid experts
    assert r.indices.shape == (n, k) and r.weights.shape == (n, k)
    assert int(r.indices.min()) >= 0 and int(r.indices.max()) < e
    assert all(len(set(row)) == k for row in r.indices.tolist())

    # scores as configured; selection uses the bias only for noaux_tc
    logits = x @ router.weight.T
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    torch.testing.assert_close(r.scores, scores)
    choice = scores + router.e_score_correction_bias if cfg.topk_method == "noaux_tc" else scores.clone()

    # group limits: the chosen experts lie in the topk_group best groups
    allowed = torch.ones(n, e, dtype=torch.bool)
    if g > 1 and cfg.topk_method != "greedy":
        grouped = choice.view(n, g, e // g)
        gscore = grouped.topk(2, -1).values.sum(-1) if cfg.topk_method == "noaux_tc" else grouped.amax(-1)
        best = gscore.topk(cfg.topk_group, -1).indices
        allowed = torch.zeros(n, g, dtype=torch.bool).scatter_(1, best, True).repeat_interleave(e // g, dim=1)
        chosen_groups = r.indices // (e // g)
        assert all(len(set(row)) <= cfg.topk_group for row in chosen_groups.tolist())
    assert bool(allowed.gather(1, r.indices).all())

    # the chosen experts are the top K of the allowed ones
    chosen = torch.zeros(n, e, dtype=torch.bool).scatter_(1, r.indices, True)
    worst_chosen = choice.masked_fill(~chosen, float("inf")).amin(-1)
    best_other = choice.masked_fill(chosen | ~allowed, float("-inf")).amax(-1)
    assert bool((worst_chosen >= best_other).all())

    # gate weights: unbiased scores, normalised (V3 with norm_topk_prob), times routed_scaling_factor
    w = scores.gather(1, r.indices)
    if cfg.norm_topk_prob and cfg.scoring_func == "sigmoid":
        w = w / w.sum(-1, keepdim=True)
        torch.testing.assert_close(r.weights.sum(-1), torch.full((n,), cfg.routed_scaling_factor))
    torch.testing.assert_close(r.weights, w * cfg.routed_scaling_factor)


def dense_reference(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then the weighted pick: [N,D]. Obviously right, E/K times too slow."""
    f = experts.down_proj.shape[-1]
    h = torch.einsum("nd,efd->enf", x, experts.gate_up_proj)  # [E,N,2F]
    y = torch.einsum("enf,edf->end", F.silu(h[..., :f]) * h[..., f:], experts.down_proj)  # [E,N,D]
    picked = y.permute(1, 0, 2).gather(1, indices.unsqueeze(-1).expand(-1, -1, y.shape[-1]))  # [N,K,D]
    return (picked * weights.unsqueeze(-1)).sum(1)


@st.composite
def dispatch_cases(draw):
    e = draw(st.integers(1, 9))
    k = draw(st.integers(1, e))
    n = draw(st.integers(1, 40))
    skew = draw(st.sampled_from(["uniform", "one_hot_expert", "some_idle"]))
    return e, k, n, skew, draw(st.integers(0, 2**31 - 1))


def make_dispatch(e, k, n, skew, seed, d=12, f=8):
    gen = torch.Generator().manual_seed(seed)
    cfg = tiny_config(n_routed_experts=e, num_experts_per_tok=k, n_group=1, topk_group=1, hidden_size=d,
                      moe_intermediate_size=f)
    experts = Experts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * 0.3)
    scores = torch.rand(n, e, generator=gen)
    if skew == "one_hot_expert":
        scores[:, 0] += 10.0  # every token picks expert 0
    elif skew == "some_idle" and e > k:
        scores[:, : e - k] -= 10.0  # the first E-K experts get no token
    indices = scores.topk(k, -1).indices
    weights = torch.rand(n, k, generator=gen)
    x = torch.randn(n, d, generator=gen)
    return experts, x, indices, weights


@SETTINGS
@given(dispatch_cases(), st.booleans())
def test_dispatch_equals_dense_reference_with_gradients(case, grouped):
    experts, x, indices, weights = make_dispatch(*case)
    experts.use_grouped_mm = grouped
    params = [experts.gate_up_proj, experts.down_proj]
    x1, w1 = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = experts(x1, indices, w1)
    x2, w2 = x.clone().requires_grad_(), weights.clone().requires_grad_()
    ref = dense_reference(experts, x2, indices, w2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    g_out = torch.autograd.grad((out * probe).sum(), [x1, w1, *params])
    g_ref = torch.autograd.grad((ref * probe).sum(), [x2, w2, *params])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class MatmulRows(TorchDispatchMode):
    """Records (op name, rows of the left operand) of every matmul-like aten op."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "_grouped_mm", "matmul", "linear"):
            a = args[1] if name == "addmm" else args[0]
            self.calls.append((name, a.shape[-2] if a.ndim >= 2 else 1))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grouped", [True, False])
def test_dispatch_runs_each_expert_once_on_its_tokens_only(grouped):
    """No per-token loop and no expert applied to tokens that did not choose it: N*K rows per projection."""
    for n in (16, 64):
        experts, x, indices, weights = make_dispatch(8, 2, n, "some_idle", seed=n)
        experts.use_grouped_mm = grouped
        with torch.no_grad(), MatmulRows() as rec:
            experts(x, indices, weights)
        rows = sum(r for _, r in rec.calls)
        assert rows == 2 * n * 2  # gate_up and down projections, each on the N*K token copies
        busy = len(set(indices.reshape(-1).tolist()))
        assert len(rec.calls) == (2 if grouped else 2 * busy)  # independent of N: no per-token work
        if grouped:
            assert {name for name, _ in rec.calls} == {"_grouped_mm"}


def test_dispatch_under_bf16_autocast_close_to_fp32():
    experts, x, indices, weights = make_dispatch(8, 2, 32, "uniform", seed=0, d=64, f=32)
    ref = dense_reference(experts, x, indices, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, indices, weights)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def random_moe(cfg, std: float) -> MoE:
    """A MoE layer with Normal(0, std) parameters."""
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, std)
    return moe


def test_moe_counts_every_routed_token_and_skips_padding():
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2)
    moe = random_moe(cfg, 0.1).train()
    x = torch.randn(2, 10, cfg.hidden_size)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    seen = []
    hook = moe.gate.register_forward_hook(lambda mod, args, out: seen.append(out))  # routing capture
    out = moe(x, mask)
    hook.remove()
    assert out.shape == x.shape
    assert float(moe.load_counts.sum()) == int(mask.sum()) * 3  # padding is routed but not counted
    torch.testing.assert_close(moe.load_counts, torch.bincount(seen[0].indices[mask.reshape(-1).bool()]
                                                               .reshape(-1), minlength=8).float())


def test_loss_weights_are_read_from_the_config_at_use_time():
    """Changing seq_aux_loss_alpha / router_z_loss_coef on the config object (as a resumed run does)
    changes the next aux loss of a module built before the change."""
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=2, seq_aux_loss_alpha=0.0, router_z_loss_coef=0.0)
    moe = random_moe(cfg, 0.3).train()
    x = torch.randn(2, 6, cfg.hidden_size)
    moe(x)
    assert float(moe.aux_loss.detach()) == 0.0
    cfg.seq_aux_loss_alpha = 0.01
    moe(x)
    seq_only = float(moe.aux_loss.detach())
    assert seq_only > 0
    cfg.router_z_loss_coef = 0.001
    moe(x)
    assert float(moe.aux_loss.detach()) > seq_only


@pytest.mark.parametrize("n", [1, 3])
def test_moe_step_runs_only_the_chosen_experts_and_equals_forward(n):
    """The few-token decoding path calls `Experts.expert_forward` once per chosen expert; values == forward."""
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)
    moe = random_moe(cfg, 0.1).eval()
    x = torch.randn(1, n, cfg.hidden_size)
    calls = []
    real = moe.experts.expert_forward
    moe.experts.expert_forward = lambda e, rows: calls.append((e, rows.shape[0])) or real(e, rows)
    with torch.no_grad():
        got, ref = moe.step(x), moe(x)
        routing = moe.gate(x.reshape(-1, cfg.hidden_size))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    chosen = routing.indices.reshape(-1).tolist()
    assert sorted(e for e, _ in calls) == sorted(set(chosen))  # each chosen expert once, no other
    assert sum(m for _, m in calls) == len(chosen)  # on exactly the rows that chose it


def test_experts_stages_compose_to_forward():
    """dispatch -> compute -> combine (the seams expert parallelism swaps) == forward."""
    experts, x, indices, weights = make_dispatch(8, 2, 16, "uniform", seed=3)
    with torch.no_grad():
        d = experts.dispatch(x, indices, weights)
        assert d.x.shape == (16 * 2, x.shape[1]) and d.counts.tolist() == torch.bincount(
            indices.reshape(-1), minlength=8).tolist()
        torch.testing.assert_close(experts.combine(experts.compute(d), d, x), experts(x, indices, weights))
