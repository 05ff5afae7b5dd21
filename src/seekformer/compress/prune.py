"""`seekformer compress prune`: drop the least salient routed experts of every MoE layer.

Shapes: N tokens, D hidden, E routed experts, K experts per token, G expert groups.

Statistics over calibration text (any pretraining source: builtin, files, folders, hf:; for `builtin`
the documents the quickstart recipe holds out for validation are skipped, so held-out scores stay
held-out): per layer and routed expert, the tokens routed to it, the gate-weight mass, and the saliency
sum over its tokens of gate weight x ||expert output||_2 (the size of what the expert adds to the residual
stream). A forward hook on each `MoE` reads the router's decision (`Routing`) and the layer input; no
module state is touched.

Every layer keeps the same number of experts (`n_routed_experts` is one config value). With group-limited
routing (n_group G > 1) each group keeps the same number of experts, its most salient ones, so groups stay
contiguous blocks and `n_group` still divides the count; when the kept count cannot be split that way
(not a multiple of G, or fewer than 2 per group for noaux_tc) routing falls back to n_group = 1 and the
statistics say so. The router rows and e_score_correction_bias entries of the kept experts are kept in
order, so the remaining experts see exactly the scores they saw before. `--method random` draws the kept
experts with a seed under the same per-group rule (the ablation baseline).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .common import CompressError, check_out, load_with_tokenizer


def parse_keep(keep: str | float | int, num_experts: int, top_k: int) -> int:
    """'0.5' (a fraction in (0,1)) or '8' (a count) -> experts kept per layer; CompressError when invalid."""
    text = str(keep).strip()
    try:
        value = float(text)
    except ValueError:
        raise CompressError(f"--keep must be a fraction in (0, 1) or a whole number of experts, got {keep!r}") from None
    if 0 < value < 1:
        n = max(1, round(value * num_experts))
    elif value >= 1 and value == int(value) and "." not in text:
        n = int(value)
    else:
        raise CompressError(f"--keep must be a fraction in (0, 1) or a whole number of experts, got {keep!r}")
    if n >= num_experts:
        raise CompressError(f"--keep {keep} keeps {n} of {num_experts} experts: it must be below the expert count")
    if n < top_k:
        raise CompressError(f"--keep {keep} keeps {n} experts, fewer than num_experts_per_tok={top_k}")
    return n


def calibration_documents(source: str, max_docs: int | None = None):
    """Documents of `source` for calibration (builtin: the training part only)."""
    from ..data.corpus import check_sources, iter_documents

    if source == "builtin":
        from ..data.shards import is_validation

        docs = (d for i, d in enumerate(iter_documents(["builtin"])) if not is_validation(0, i, 0.02))
    else:
        docs = iter_documents(check_sources([source]))
    for i, d in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            return
        yield d


@torch.no_grad()
def routing_statistics(model, tokenizer, source: str, max_tokens: int = 20000, window: int = 256) -> dict:
    """{layer name: {"tokens": [E], "gate_mass": [E], "saliency": [E]}} over about `max_tokens` tokens."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, moe in model.moe_layers():
        if name.startswith("mtp."):
            continue
        e = moe.num_experts
        st = stats[name] = {k: torch.zeros(e, dtype=torch.float64) for k in ("tokens", "gate_mass", "saliency")}

        def hook(module, args, _out, st=st):
            x = args[0].reshape(-1, args[0].shape[-1])
            r = module.gate(x)
            flat, w = r.indices.reshape(-1), r.weights.reshape(-1).double()
            st["tokens"] += torch.bincount(flat, minlength=module.num_experts).double()
            st["gate_mass"].index_add_(0, flat, w)
            rows = torch.arange(x.shape[0]).repeat_interleave(r.indices.shape[1])
            for ex in flat.unique().tolist():
                sel = flat == ex
                y = module.experts.expert_forward(ex, x[rows[sel]])
                st["saliency"][ex] += float((w[sel] * y.double().norm(dim=-1)).sum())

        hooks.append(moe.register_forward_hook(hook))
    seen = 0
    try:
        for doc in calibration_documents(source):
            ids = tokenizer.encode(doc)
            for s in range(0, len(ids), window):
                chunk = ids[s:s + window]
                if len(chunk) < 2:
                    continue
                model(torch.tensor([chunk]))
                seen += len(chunk)
                if seen >= max_tokens:
                    break
            if seen >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise CompressError(f"calibration source {source!r} gave no text")
    out = {n: {k: v.tolist() for k, v in st.items()} for n, st in stats.items()}
    out["_tokens_seen"] = seen
    return out


def choose_experts(saliency: list[float], keep: int, n_group: int, method: str, gen: torch.Generator) -> list[int]:
    """Indices (sorted) of the experts to keep; per group when `n_group` > 1 (keep // n_group each)."""
    e = len(saliency)
    groups = [list(range(g * e // n_group, (g + 1) * e // n_group)) for g in range(n_group)]
    per = keep // n_group
    kept: list[int] = []
    for members in groups:
        if method == "random":
            order = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
        else:
            order = sorted(members, key=lambda i: -saliency[i])
        kept += order[:per]
    return sorted(kept)


def _align_neurons(gu_k: torch.Tensor, down_k: torch.Tensor, gu_d: torch.Tensor, down_d: torch.Tensor):
    """Expert d's weights with its F hidden neurons permuted to match expert k's (gate_up [2F,D], down [D,F]):
    the assignment maximising the summed inner products of each neuron's gate row, up row and down column
    (weight matching, as MC-SMoE does before averaging)."""
    from scipy.optimize import linear_sum_assignment

    f = down_k.shape[1]
    sim = gu_k[:f] @ gu_d[:f].T + gu_k[f:] @ gu_d[f:].T + down_k.T @ down_d  # [F,F]
    _, perm = linear_sum_assignment(sim.double().numpy(), maximize=True)
    perm = torch.as_tensor(perm)
    return torch.cat([gu_d[:f][perm], gu_d[f:][perm]]), down_d[:, perm]


def merge_experts(moe, kept: list[int], freq: list[float], n_group: int = 1) -> dict[int, list[int]]:
    """Fold each dropped routed expert into the kept one whose router row is most similar (cosine; within its
    expert group when `n_group` > 1, i.e. when groups stay): the kept expert's weights become the routing-frequency-weighted average
    of itself and the experts folded into it, their neurons aligned first. In place on the full-size
    `moe.experts` tensors (before the dropped rows are removed); returns {kept: [folded ones]}."""
    e = moe.num_experts
    rows = torch.nn.functional.normalize(moe.gate.weight.detach().float(), dim=-1)
    sim = rows @ rows.T  # [E,E]
    group_of = {i: g for g in range(n_group) for i in range(g * e // n_group, (g + 1) * e // n_group)}
    into: dict[int, list[int]] = {k: [] for k in kept}
    for d in range(e):
        if d in into:
            continue
        cands = [k for k in kept if group_of[k] == group_of[d]] or kept
        into[max(cands, key=lambda k: float(sim[d, k]))].append(d)
    gu, down = moe.experts.gate_up_proj.data, moe.experts.down_proj.data
    for k, folded in into.items():
        if not folded:
            continue
        w = torch.tensor([freq[k]] + [freq[d] for d in folded], dtype=torch.float64) + 1e-6
        w = (w / w.sum()).float()
        acc_gu, acc_down = gu[k] * w[0], down[k] * w[0]
        for wd, d in zip(w[1:], folded):
            a_gu, a_down = _align_neurons(gu[k], down[k], gu[d], down[d])
            acc_gu, acc_down = acc_gu + wd * a_gu, acc_down + wd * a_down
        gu[k], down[k] = acc_gu, acc_down
    return {k: v for k, v in into.items() if v}


@torch.no_grad()
def prune_model(model, keep: int, stats: dict, method: str = "routing", seed: int = 0, merge: bool = False) -> dict:
    """Keep `keep` routed experts per MoE layer (MTP blocks included) in place; returns what was kept (and,
    with `merge`, which dropped experts were folded into which kept one)."""
    cfg = model.config
    g = cfg.n_group or 1
    per_group_ok = g > 1 and keep % g == 0 and (keep // g >= 2 or cfg.topk_method != "noaux_tc") \
        and cfg.num_experts_per_tok <= (cfg.topk_group or 1) * (keep // g)
    groups = g if per_group_ok else 1
    gen = torch.Generator().manual_seed(seed)
    kept_by_layer, merged_by_layer = {}, {}
    for name, moe in model.moe_layers():
        sal = stats[name]["saliency"] if name in stats else _mean_saliency(stats)  # MTP blocks: no statistics
        kept = choose_experts(sal, keep, groups, method, gen)
        if merge:
            freq = stats[name]["tokens"] if name in stats else _mean_saliency(stats, "tokens")
            merged_by_layer[name] = merge_experts(moe, kept, freq, groups)
        idx = torch.tensor(kept)
        moe.gate.weight = torch.nn.Parameter(moe.gate.weight[idx].clone())
        moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias[idx].clone()
        moe.experts.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj[idx].clone())
        moe.experts.down_proj = torch.nn.Parameter(moe.experts.down_proj[idx].clone())
        for m in (moe, moe.gate, moe.experts):
            m.num_experts = keep
        moe.load_counts = torch.zeros(keep)
        kept_by_layer[name] = kept
    new = {"n_routed_experts": keep}
    if not per_group_ok and g > 1:
        new.update(n_group=1, topk_group=1)
    for k, v in new.items():
        setattr(cfg, k, v)
    for _, moe in model.moe_layers():
        moe.gate.n_group = cfg.n_group or 1
        moe.gate.topk_group = cfg.topk_group or 1
    cfg.validate()
    info = {"kept": kept_by_layer, "group_routing_kept": bool(per_group_ok or g == 1), **new}
    if merge:
        info["merged_into"] = merged_by_layer
    return info


def _mean_saliency(stats: dict, key: str = "saliency") -> list[float]:
    layers = [v[key] for k, v in stats.items() if not k.startswith("_")]
    return torch.tensor(layers).mean(0).tolist()


def plot_usage(stats: dict, kept: dict, path: Path) -> None:
    """Per-layer bar chart of the share of routed tokens per expert, kept experts highlighted."""
    from ..figures import pyplot, save_figure

    plt = pyplot()

    layers = [k for k in stats if not k.startswith("_")]
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.8 * len(layers) + 0.5), squeeze=False)
    for ax, name in zip(axes[:, 0], layers):
        tokens = torch.tensor(stats[name]["tokens"])
        share = (tokens / tokens.sum().clamp_min(1)).tolist()
        colors = ["tab:blue" if i in kept.get(name, []) else "tab:gray" for i in range(len(share))]
        ax.bar(range(len(share)), share, color=colors)
        ax.set_ylabel(name.replace("model.layers.", "L").replace(".mlp", ""), fontsize=8)
        ax.set_xticks(range(len(share)))
        ax.tick_params(labelsize=7)
    axes[0, 0].set_title("share of routed tokens per expert (blue: kept)")
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    save_figure(fig, path)


def recover(model_dir: Path, pruned, tokenizer, calibration: str, steps: int, lr: float, work: Path,
            log=print) -> dict:
    """Fine-tune the pruned model in place for `steps` steps on the calibration source by distillation from
    the unpruned model in `model_dir` (compress/distill.py: W=0.5, T=1, the pretraining trainer). Returns
    the run's validation losses (before, after)."""
    from ..checkpoint import save_model
    from .distill import DistillTrainer, student_recipe

    teacher, _, _ = load_with_tokenizer(model_dir)
    save_model(pruned, work / "pruned")
    recipe = student_recipe(model_dir, str(work / "pruned" / "config.json"), [calibration], steps, work / "run",
                            train={"lr": lr, "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1,
                                   "progress": False, "save_every": steps, "eval_every": steps})
    trainer = DistillTrainer(recipe, teacher, kd_weight=0.5, temperature=1.0,
                             init_state={k: v.clone() for k, v in pruned.state_dict().items()})
    try:
        trainer.prepare()
        result = trainer.run()
    finally:
        trainer.par.close()
    pruned.load_state_dict(trainer.model.state_dict())
    losses = [v for _, v in result.val_losses]
    log(f"recovery: validation loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps")
    return {"steps": steps, "lr": lr, "val_loss_before": losses[0], "val_loss_after": losses[-1]}


def prune_dir(model_dir: str | os.PathLike, out: str | os.PathLike, keep: str | float | int,
              calibration: str = "builtin", method: str = "routing", seed: int = 0,
              max_tokens: int = 20000, merge: bool = False, recover_steps: int = 0,
              recover_lr: float = 3e-4, log=print) -> Path:
    """Prune a model directory into `out` (model, tokenizer, prune_stats.json, expert_usage.png), atomically;
    `merge` folds the dropped experts into kept ones, `recover_steps` > 0 fine-tunes the result by
    distillation from the unpruned model."""
    import tempfile

    from ..checkpoint import atomic_directory, load_config, save_model

    if method not in ("routing", "random"):
        raise CompressError(f"--method must be 'routing' or 'random', got {method!r}")
    if recover_steps < 0 or not recover_lr > 0:
        raise CompressError("--recover-steps must be >= 0 and --recover-lr > 0")
    out = check_out(out, model_dir)
    cfg = load_config(model_dir)
    if cfg.quantization_config:
        raise CompressError(f"{model_dir} is quantized; prune the float model, then quantize")
    if cfg.n_routed_experts <= 0 or cfg.first_k_dense_replace >= cfg.num_hidden_layers:
        raise CompressError(f"{model_dir} is a dense model (no routed experts): nothing to prune")
    n_keep = parse_keep(keep, cfg.n_routed_experts, cfg.num_experts_per_tok)
    model, tok, _ = load_with_tokenizer(model_dir)
    if tok is None:
        raise CompressError(f"{model_dir} has no tokenizer.json: it is needed to read the calibration text")
    stats = routing_statistics(model, tok, calibration, max_tokens=max_tokens)
    info = prune_model(model, n_keep, stats, method, seed, merge=merge)
    if recover_steps:
        with tempfile.TemporaryDirectory(prefix="seekformer-recover-") as work:
            info["recovery"] = recover(Path(model_dir), model, tok, calibration, recover_steps, recover_lr,
                                       Path(work), log)
        model.eval()
    report = {"source": str(model_dir), "calibration": calibration, "method": method, "seed": seed,
              "merge": merge, "experts_before": cfg.n_routed_experts, **info, "statistics": stats}
    with atomic_directory(out) as tmp:
        save_model(model, tmp, extra_files=tok.files())
        (tmp / "prune_stats.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_usage(stats, info["kept"], tmp / "expert_usage.png")
    return out
