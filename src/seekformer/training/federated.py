"""Federated fine-tuning with Flower, simulated in one process: `federated_finetune(recipe)`.

The task's training split is partitioned over `federated.clients` clients (iid, Dirichlet(alpha) label skew,
or by_label shards). Each round the server samples `fraction_fit` of the clients; each runs `local_steps`
ordinary fine-tuning steps (MultiTaskTrainer.train_step, a fresh AdamW per round, FedProx's proximal
term mu/2 ||w - w_global||^2 added as a gradient hook) from the global weights and returns its weights as
a Flower `NumPyClient.fit` result; the Flower strategy (FedAvg, FedProx or FedAdam from
`flwr.server.strategy`) aggregates them with its own `aggregate_fit`.

In-process, not `flwr.simulation.run_simulation`: Flower's simulation engine runs clients as Ray actors
(one process per virtual client, each loading the model), which on a 2-core machine costs more than the
training; the loop here drives the same Flower client and strategy objects round by round, without a
network, and `seekformer federated server|client` (cli/federated.py) runs them over Flower's gRPC.

Exchanged weights: the trainable parameters (all of them for train.method full, LoRA adapters + heads for
lora, heads for frozen) and, with full, the MoE routers' balancing biases. Expert-sparse uplink
(`expert_sparse: true`): a client sends only the rows of the stacked routed-expert tensors [E,...] of the
experts its data routed tokens to (plus every shared weight); the server fills the other rows with the
global values (no update from that client). Uplink bytes are counted on the arrays actually sent.

Client-level DP (`dp_noise_multiplier`, `dp_clip_norm`): each client's update w_k - w_global is clipped to
L2 norm S, and the server adds N(0, (sigma S / m)^2) to the unweighted mean of the m updates (DP-FedAvg,
McMahan et al. 2018); the account (RDP, sampling rate fraction_fit) is reported in federated.json.

Output: the ordinary fine-tuned model directory (OUT), plus OUT/federated.json (client_label_counts,
rounds, per-round metrics, uplink bytes) and OUT/federated.png (test accuracy per round).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RecipeError
from .multitask import FinetuneResult, MultiTaskTrainer

FEDERATED_FILE = "federated.json"
PLOT_FILE = "federated.png"


# ---------------------------------------------------------------------- partitions
def partition(labels: list[int], clients: int, how: str, alpha: float = 0.5, seed: int = 0) -> list[list[int]]:
    """Indices of each client's examples. iid: a seeded shuffle cut in equal parts; dirichlet: per label,
    proportions ~ Dir(alpha) over the clients; by_label: each label's examples shared by the clients that
    hold it (client k holds label k mod C). Every client gets at least one example."""
    n = len(labels)
    if clients > n:
        raise RecipeError(f"federated.clients ({clients}) is more than the training examples ({n}); lower it")
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    classes = sorted(set(labels))
    parts: list[list[int]] = [[] for _ in range(clients)]
    if how == "iid":
        for k, chunk in enumerate(np.array_split(rng.permutation(n), clients)):
            parts[k] = chunk.tolist()
    elif how == "dirichlet":
        for c in classes:
            idx = rng.permutation(np.nonzero(y == c)[0])
            p = rng.dirichlet([alpha] * clients)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
    elif how == "by_label":
        for c in classes:
            owners = [k for k in range(clients) if classes[k % len(classes)] == c]
            if not owners:  # fewer clients than labels: the label goes to client c mod clients
                owners = [classes.index(c) % clients]
            idx = rng.permutation(np.nonzero(y == c)[0])
            for k, chunk in zip(owners, np.array_split(idx, len(owners))):
                parts[k].extend(chunk.tolist())
    else:
        raise RecipeError(f"unknown federated.partition {how!r}; choose iid, dirichlet or by_label")
    for k in range(clients):  # an empty client takes one example from the largest
        if not parts[k]:
            big = max(range(clients), key=lambda j: len(parts[j]))
            parts[k].append(parts[big].pop())
    return [sorted(p) for p in parts]


# ---------------------------------------------------------------------- weights
class WeightSet:
    """The exchanged tensors of a model: (name, tensor) of the trainable parameters (+ MoE biases)."""

    def __init__(self, model: torch.nn.Module, with_biases: bool) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".mtp." not in f".{n}"]
        if with_biases:
            self.named += [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        self.names = [n for n, _ in self.named]

    def get(self) -> list[np.ndarray]:
        """The weights as numpy arrays, in `names` order (what Flower sends)."""
        return [t.detach().cpu().numpy().copy() for _, t in self.named]

    @torch.no_grad()
    def set(self, arrays: list[np.ndarray]) -> None:
        """Copy `arrays` (in `names` order) into the model's tensors."""
        for (_, t), a in zip(self.named, arrays):
            t.copy_(torch.from_numpy(np.asarray(a)).to(t.device, t.dtype))

    def expert_rows(self) -> list[bool]:
        """Which exchanged tensors are stacked routed-expert weights [E,...] (expert-sparse candidates)."""
        return [n.endswith(("experts.gate_up_proj", "experts.down_proj")) and "lora_" not in n for n in self.names]


def sparse_payload(arrays: list[np.ndarray], is_expert: list[bool], layer_of: list[int | None],
                   used: dict[int, set[int]]) -> tuple[list[np.ndarray], int]:
    """(what an expert-sparse client sends, its bytes): expert tensors cut to the used rows, plus which rows as a
    bitmask of ceil(E / 8) bytes (a client whose data reached every expert sends as much as a full update)."""
    sent, nbytes = [], 0
    for a, ex, layer in zip(arrays, is_expert, layer_of):
        if ex:
            rows = np.array(sorted(used.get(layer, set())), dtype=np.int64)
            part = a[rows]
            sent.append(part)
            nbytes += part.nbytes + -(-a.shape[0] // 8)
        else:
            sent.append(a)
            nbytes += a.nbytes
    return sent, nbytes


# ---------------------------------------------------------------------- the Flower client
def _numpy_client_class():
    from flwr.client import NumPyClient

    class SeekClient(NumPyClient):
        """One federated client: its examples, local training on the shared trainer, and its uplink."""

        def __init__(self, fed: FederatedRun, k: int) -> None:
            self.fed, self.k = fed, k

        def get_parameters(self, config):
            return self.fed.weights.get()

        def fit(self, parameters, config):
            return self.fed.local_fit(self.k, parameters, config)

    return SeekClient


class FederatedRun:
    """The simulation: a prepared MultiTaskTrainer (model, task data), the clients and the strategy."""

    def __init__(self, recipe, console=None) -> None:
        self.recipe, self.f = recipe, recipe.federated
        self.trainer = MultiTaskTrainer(recipe, console=console)
        self.console = self.trainer.console

    def prepare(self) -> None:
        """Base model, tokenizer, the task's data and its partition over the clients, the shared weights."""
        from ..data.tasks import TaskBatches

        tr = self.trainer
        tr.prepare()
        (self.task,) = tr.names
        data = tr.data[self.task]
        self.examples = data.train
        self.f.validate(len(self.examples))
        if data.decl["type"] != "classification" and self.f.partition != "iid":
            raise RecipeError("federated.partition dirichlet / by_label needs a classification task; use iid")
        labels = [e["label"] for e in self.examples] if data.decl["type"] == "classification" else [0] * len(
            self.examples)
        self.parts = partition(labels, self.f.clients, self.f.partition, self.f.alpha, tr.t.seed)
        names = data.decl.get("labels")
        self.client_label_counts = [
            {(names[i] if names else str(i)): int(c) for i, c in zip(*np.unique([labels[j] for j in p],
                                                                                 return_counts=True))}
            for p in self.parts]
        t = tr.t
        self.batches = [TaskBatches([self.examples[i] for i in p], data.decl["type"], self.f.local_batch_size,
                                    tr.tokenizer.pad_token_id, seed=t.seed + 1000 + k) for k, p in enumerate(self.parts)]
        self.weights = WeightSet(tr.model, with_biases=t.method == "full")
        is_expert = self.weights.expert_rows()
        self.is_expert = is_expert if self.f.expert_sparse else [False] * len(is_expert)
        moe_names = [n for n, _ in tr.model.lm.moe_layers()]
        self.layer_of = [next((i for i, m in enumerate(moe_names) if n.startswith(f"lm.{m}.")), None)
                         for n in self.weights.names]
        self.moe = [m for _, m in tr.model.lm.moe_layers()]
        self.routed: dict[int, set[int]] = {}
        for i, m in enumerate(self.moe):
            m.gate.register_forward_hook(self._route_hook(i))
        self.client_cls = _numpy_client_class()  # SeekClient(run, k): client k as a Flower NumPyClient
        self.global_arrays = self.weights.get()
        self.rng = np.random.default_rng(t.seed + 7)

    def _route_hook(self, i: int):
        def hook(module, inputs, routing):
            if module.training:
                self.routed.setdefault(i, set()).update(routing.indices.unique().tolist())
        return hook

    # ------------------------------------------------------------------ one client's round
    def local_fit(self, k: int, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        """Client k's round: load the global weights, train `local_steps` on its partition (FedProx term if
        set), return (its weights, its example count, metrics); with expert_sparse the uplink counts only the
        rows it sends (the server keeps the global values of the others)."""
        tr, f = self.trainer, self.f
        self.weights.set(parameters)
        tr.loaders[self.task] = self.batches[k]
        groups = [{**g, "params": list(g["params"])} for g in tr.optimizer.param_groups]
        for g in groups:
            g["lr"] = g.get("initial_lr", g["lr"])
        tr.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
        tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda _: 1.0)
        hook = None
        mu = float(config.get("proximal_mu", 0.0))
        if mu > 0:  # FedProx: grad += mu (w - w_global)
            anchor = {id(p): p.detach().clone() for g in tr.optimizer.param_groups for p in g["params"]}

            def prox(opt, args, kwargs):
                for g in opt.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            p.grad.add_(p.detach() - anchor[id(p)], alpha=mu)
            hook = tr.optimizer.register_step_pre_hook(prox)
        self.routed = {}
        losses = []
        for _ in range(f.local_steps):
            losses.append(tr.train_step()["loss"])
        if hook is not None:
            hook.remove()
        arrays = self.weights.get()
        if f.dp_noise_multiplier > 0:  # client-level DP: clip the update
            delta = [a - g for a, g in zip(arrays, parameters)]
            norm = float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta)))
            scale = min(1.0, f.dp_clip_norm / (norm + 1e-12))
            arrays = [g + d * scale for g, d in zip(parameters, delta)]
        if f.expert_sparse:
            sent, nbytes = sparse_payload(arrays, self.is_expert, self.layer_of, self.routed)
            arrays = self._fill(sent, parameters)
        else:
            nbytes = sum(a.nbytes for a in arrays)
        full = sum(a.nbytes for a in arrays)
        return arrays, len(self.parts[k]), {"loss": float(np.mean(losses)), "uplink_bytes": nbytes,
                                            "full_bytes": full}

    def _fill(self, sent: list[np.ndarray], parameters: list[np.ndarray]) -> list[np.ndarray]:
        """Server side of the expert-sparse uplink: rows not sent keep the global values."""
        out = []
        for a, g, ex, layer in zip(sent, parameters, self.is_expert, self.layer_of):
            if ex:
                full = np.array(g, copy=True)
                rows = sorted(self.routed.get(layer, set()))
                full[rows] = a
                out.append(full)
            else:
                out.append(a)
        return out

    # ------------------------------------------------------------------ the server
    def strategy(self, evaluate_fn=None, min_fit_clients: int = 1):
        """The Flower strategy the recipe names, starting from the model's weights."""
        from flwr.common import ndarrays_to_parameters
        from flwr.server.strategy import FedAdam, FedAvg, FedProx

        common = dict(fraction_fit=self.f.fraction_fit, fraction_evaluate=0.0, min_fit_clients=min_fit_clients,
                      min_available_clients=self.f.clients, evaluate_fn=evaluate_fn,
                      initial_parameters=ndarrays_to_parameters(self.global_arrays))
        if self.f.strategy != "fedadam":
            common["fit_metrics_aggregation_fn"] = _sum_bytes
        if self.f.strategy == "fedprox":
            return FedProx(proximal_mu=self.f.proximal_mu, **common)
        if self.f.strategy == "fedadam":
            return FedAdam(eta=self.f.server_lr, eta_l=self.trainer.t.lr, **common)
        return FedAvg(**common)

    def run(self) -> FinetuneResult:
        """Run the rounds in Flower's simulation; write the model, federated.json and the plot."""
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

        f = self.f
        strategy = self.strategy()
        clients = [self.client_cls(self, k) for k in range(f.clients)]
        m = max(1, int(round(f.fraction_fit * f.clients)))
        history: list[dict[str, Any]] = []
        start = time.perf_counter()
        eval_split = self.eval_split
        for rnd in range(1, f.rounds + 1):
            chosen = sorted(self.rng.choice(f.clients, size=m, replace=False).tolist())
            config = {"proximal_mu": f.proximal_mu if f.strategy == "fedprox" else 0.0, "round": rnd}
            results = []
            for k in chosen:
                arrays, n, metrics = clients[k].fit([a.copy() for a in self.global_arrays], config)
                results.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)))
            params, _ = strategy.aggregate_fit(rnd, results, [])
            new = parameters_to_ndarrays(params)
            if f.dp_noise_multiplier > 0:  # DP-FedAvg: unweighted mean of clipped updates + noise
                ups = [[a - g for a, g in zip(parameters_to_ndarrays(r.parameters), self.global_arrays)]
                       for _, r in results]
                std = f.dp_noise_multiplier * f.dp_clip_norm / len(ups)
                new = [g + np.mean([u[i] for u in ups], axis=0)
                       + self.rng.normal(0.0, std, g.shape).astype(g.dtype) for i, g in enumerate(self.global_arrays)]
            self.global_arrays = new
            self.weights.set(new)
            rec: dict[str, Any] = {"round": rnd, "clients": chosen,
                                   "train_loss": float(np.mean([r.metrics["loss"] for _, r in results])),
                                   "uplink_bytes": int(sum(r.metrics["uplink_bytes"] for _, r in results)),
                                   "full_uplink_bytes": int(sum(r.metrics["full_bytes"] for _, r in results))}
            rec.update(self.evaluate_round())
            history.append(rec)
            self.console.print(f"round {rnd}/{f.rounds}: loss {rec['train_loss']:.3f}"
                               + (f", {eval_split} accuracy {rec.get(f'{eval_split}_accuracy', float('nan')):.3f}"
                                  if f"{eval_split}_accuracy" in rec else "")
                               + f", uplink {rec['uplink_bytes'] / 1e6:.2f} MB")
        return self.finish(history, time.perf_counter() - start)

    @property
    def eval_split(self) -> str:
        """The split evaluated after each round: test if the task has one, else validation."""
        return "test" if self.trainer.data[self.task].test else "validation"

    def evaluate_round(self) -> dict[str, float]:
        """Metrics of the current weights on the test split (else validation), prefixed by the split."""
        from ..evaluation.metrics import evaluate_task

        tr = self.trainer
        examples = getattr(tr.data[self.task], self.eval_split) or []
        if self.f.eval_examples:
            examples = examples[: self.f.eval_examples]
        if not examples:
            return {}
        res = evaluate_task(tr.model, tr.tokenizer, tr.data[self.task].decl, examples, tr.t.eval_batch_size)
        tr.model.train()
        return {f"{self.eval_split}_{k}": v for k, v in res.items()}

    def finish(self, history: list[dict[str, Any]], seconds: float) -> FinetuneResult:
        """Final evaluation, the model directory with federated.json, and the plot."""
        tr, f = self.trainer, self.f
        results_all: dict[str, Any] = {"rounds": f.rounds, "train_seconds": seconds}
        if tr.t.validate and tr.data[self.task].validation:
            results_all["validation"] = tr.evaluate("validation")
        if tr.t.test and tr.data[self.task].test:
            results_all["test"] = tr.evaluate("test")
        report = self.report(history)
        tr.extra_output_files = lambda: {FEDERATED_FILE: json.dumps(report, indent=2) + "\n"}
        tr.save(results_all)
        plot_rounds(tr.out, history, self.eval_split)
        return FinetuneResult(tr.out, f.rounds * f.local_steps, seconds,
                              {s: results_all[s] for s in ("validation", "test") if s in results_all})

    def report(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """federated.json: settings, per-client label counts, rounds and per-round metrics, uplink bytes."""
        f = self.f
        out: dict[str, Any] = {"clients": f.clients, "rounds": f.rounds, "strategy": f.strategy,
                               "partition": f.partition, "alpha": f.alpha, "fraction_fit": f.fraction_fit,
                               "local_steps": f.local_steps, "local_batch_size": f.local_batch_size,
                               "method": self.trainer.t.method, "expert_sparse": f.expert_sparse,
                               "simulation": "in-process loop over flwr NumPyClient / strategy objects",
                               "client_label_counts": self.client_label_counts,
                               "client_examples": [len(p) for p in self.parts], "per_round": history}
        if f.dp_noise_multiplier > 0:
            from .privacy.accounting import epsilon_of

            delta = 1.0 / (10 * f.clients)
            out["client_dp"] = {"noise_multiplier": f.dp_noise_multiplier, "clip_norm": f.dp_clip_norm,
                                "sample_rate": f.fraction_fit, "delta": delta,
                                "epsilon": epsilon_of("rdp", f.dp_noise_multiplier, f.fraction_fit, f.rounds, delta),
                                "unit": "client (user-level DP)"}
        return out


def _sum_bytes(metrics: list[tuple[int, dict]]) -> dict:
    """Flower fit-metrics aggregation: total uplink bytes and the example-weighted mean loss."""
    n = sum(k for k, _ in metrics) or 1
    return {"uplink_bytes": sum(int(m.get("uplink_bytes", 0)) for _, m in metrics),
            "loss": sum(k * float(m.get("loss", 0.0)) for k, m in metrics) / n}


def plot_rounds(out_dir: str | Path, history: list[dict[str, Any]], split: str) -> Path:
    """OUT/federated.png: accuracy (and training loss) per round."""
    from ..figures import pyplot, save_figure

    plt = pyplot()

    out = Path(out_dir)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [h["round"] for h in history]
    acc = [h.get(f"{split}_accuracy") for h in history]
    if any(a is not None for a in acc):
        axes[0].plot(rounds, acc, "o-")
    axes[0].set_title(f"{split} accuracy per round")
    axes[1].plot(rounds, [h["train_loss"] for h in history], "o-")
    axes[1].set_title("mean client training loss")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out / PLOT_FILE)


def federated_finetune(recipe, console=None) -> FinetuneResult:
    """Fine-tune as a recipe with a `federated:` section says (simulated clients); returns its result."""
    run = FederatedRun(recipe, console=console)
    run.prepare()
    return run.run()


__all__ = ["federated_finetune", "FederatedRun", "partition", "WeightSet", "sparse_payload", "FEDERATED_FILE"]
