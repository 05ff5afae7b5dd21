"""Auxiliary-loss-free load balancing, the sequence-wise balance loss and the router z-loss.

The balancing demonstration trains the same tiny MoE twice with a small self-contained AdamW loop: its
embeddings share a common direction and two experts' router rows point along it, so every token picks those
two (routing collapse). Without balancing the collapse persists; with the bias update
b += gamma * sign(mean load - load) after each step, max/mean load is <= 1.5 in every window after warm-up.
"""

from __future__ import annotations

import torch

from seekformer import SeekForCausalLM
from seekformer.nn.moe import MoE, load_stats

from .conftest import tiny_config

E, K = 8, 2
STEPS, WARMUP, WINDOW = 200, 60, 20



def balance_config(**overrides):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                n_routed_experts=E, num_experts_per_tok=K, n_group=1, topk_group=1, first_k_dense_replace=0,
                n_shared_experts=1, seq_aux_loss_alpha=0.0, router_z_loss_coef=0.0)
    base.update(overrides)
    return tiny_config(**base)


def markov_batches(steps: int, batch: int = 8, seq: int = 32, vocab: int = 64, seed: int = 1) -> list[torch.Tensor]:
    """Sequences from a fixed random Markov chain: learnable structure, deterministic."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, -1)
    out = []
    for _ in range(steps):
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for i in range(1, seq):
            x[:, i] = torch.multinomial(trans[x[:, i - 1]], 1, generator=g).squeeze(1)
        out.append(x)
    return out


def collapsing_model(gamma: float) -> SeekForCausalLM:
    cfg = balance_config(aux_free_bias_update_rate=gamma)
    model = SeekForCausalLM(cfg)
    model.reset_parameters(seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        v = torch.randn(cfg.hidden_size, generator=g)
        v /= v.norm()
        model.model.embed_tokens.weight.add_(0.5 * v)  # every token embedding shares a direction...
        for _, moe in model.moe_layers():
            moe.gate.weight[:2] += v  # ...that two experts' router rows point along
    return model


def train_and_watch_load(gamma: float, batches: list[torch.Tensor]) -> list[dict[str, dict]]:
    """A plain AdamW loop with the trainer's per-step bias update; load statistics per window of steps."""
    torch.manual_seed(0)
    model = collapsing_model(gamma).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    windows, acc = [], {}
    for step, ids in enumerate(batches, start=1):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for name, moe in model.moe_layers():
            acc[name] = acc.get(name, 0) + moe.load_counts.clone()
            stats = moe.update_bias(model.config.aux_free_bias_update_rate)
            assert set(stats) >= {"max_over_mean", "dead", "fractions"}
            assert float(moe.load_counts.sum()) == 0  # consumed
        if step % WINDOW == 0:
            windows.append({"step": step, **{n: load_stats(c) for n, c in acc.items()}})
            acc = {}
    return windows


def test_routing_collapses_without_balancing_and_not_with_it():
    batches = markov_batches(STEPS)
    layers = [n for n, _ in collapsing_model(0.0).moe_layers()]
    assert len(layers) == 2

    off = train_and_watch_load(0.0, batches)
    assert all(off[0][n]["max_over_mean"] >= 3.9 and off[0][n]["dead"] >= 4 for n in layers)  # collapsed at start
    late = [w for w in off if w["step"] > WARMUP]
    assert all(w[n]["max_over_mean"] >= 2.5 for w in late for n in layers), \
        [(w["step"], [round(w[n]["max_over_mean"], 2) for n in layers]) for w in late]

    on = train_and_watch_load(1e-2, batches)
    late = [w for w in on if w["step"] > WARMUP]
    assert all(w[n]["max_over_mean"] <= 1.5 and w[n]["dead"] == 0 for w in late for n in layers), \
        [(w["step"], [round(w[n]["max_over_mean"], 2) for n in layers]) for w in late]


def test_bias_update_rule_and_optimizer_never_touches_the_bias():
    cfg = balance_config()
    model = SeekForCausalLM(cfg).train()
    biases = [moe.gate.e_score_correction_bias for _, moe in model.moe_layers()]
    param_ids = {id(p) for p in model.parameters()}
    assert all(id(b) not in param_ids for b in biases)  # buffers: not in any optimizer built from parameters()
    assert all(not b.requires_grad and b.dtype == torch.float32 for b in biases)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-1, weight_decay=1.0)
    with torch.no_grad():
        for b in biases:
            b.copy_(torch.linspace(-0.5, 0.5, E))
    before = [b.clone() for b in biases]
    ids = torch.randint(0, cfg.vocab_size, (4, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    for b, b0 in zip(biases, before):
        assert torch.equal(b, b0)  # neither the update nor weight decay moved it

    for (_, moe), b0 in zip(model.moe_layers(), before):
        counts = moe.load_counts.clone()
        assert float(counts.sum()) == 4 * 16 * K
        stats = moe.update_bias(0.25)
        expected = b0 + 0.25 * torch.sign(counts.mean() - counts)
        torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
        assert stats["max_over_mean"] == float(counts.max() / counts.mean())
        assert stats["dead"] == float((counts == 0).sum())
        assert float(moe.load_counts.sum()) == 0

    model.to(torch.bfloat16)  # a dtype cast of the model keeps the selection bias in fp32
    assert all(moe.gate.e_score_correction_bias.dtype == torch.float32 for _, moe in model.moe_layers())


def test_sequence_balance_loss_and_z_loss_values_and_gradients():
    alpha, zc = 0.01, 0.001
    cfg = balance_config(seq_aux_loss_alpha=alpha, router_z_loss_coef=zc)
    moe = MoE(cfg).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    b, t = 3, 10
    x = torch.randn(b, t, cfg.hidden_size)
    seen = []
    hook = moe.gate.register_forward_hook(lambda mod, args, out: seen.append(out))
    moe(x)
    hook.remove()
    r = seen[0]
    scores, idx = r.scores.detach().view(b, t, E), r.indices.view(b, t, K)
    f = torch.zeros(b, E).scatter_add_(1, idx.reshape(b, -1), torch.ones(b, t * K)) * E / (K * t)  # [B,E]
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B,E]
    seq_loss = alpha * (f * p).sum(-1).mean()
    z_loss = zc * torch.logsumexp(r.logits.detach(), -1).pow(2).mean()
    torch.testing.assert_close(moe.aux_loss.detach(), seq_loss + z_loss)
    # a perfectly uniform router gives the minimum sequence loss alpha (f = 1, P = 1/E)
    assert seq_loss >= alpha * 0.999

    grad, = torch.autograd.grad(moe.aux_loss, moe.gate.weight)
    assert grad.abs().sum() > 0  # the losses train the router (through the scores, not the counts)

    moe.gate.weight.grad = None
    off = MoE(balance_config()).train()
    off(x)
    assert float(off.aux_loss) == 0.0  # both disabled: nothing added to the loss
