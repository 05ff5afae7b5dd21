"""`seekformer federated server|client RECIPE`: federated fine-tuning over Flower's gRPC (one server, N clients).

The server holds the model and the test split, runs the recipe's strategy for `federated.rounds` rounds,
waits for all `federated.clients` clients, evaluates after each round, and writes the same output as the
in-process simulation (`seekformer finetune` with a `federated:` section): the model directory,
federated.json and federated.png. Client K trains on partition K of the recipe's training split (the same
seeded partition the simulation uses), so one recipe describes the whole deployment.
"""

from __future__ import annotations

import typer


def _run(recipe: str, overrides: list[str]):
    from ..errors import RecipeError
    from ..training.federated import FederatedRun
    from ..training.multitask_recipe import load_finetune_recipe

    r = load_finetune_recipe(recipe, overrides)
    if r.federated is None:
        raise RecipeError(f"recipe {recipe} has no `federated:` section")
    from rich.console import Console

    run = FederatedRun(r, console=Console(stderr=True))
    run.prepare()
    return run


def serve_rounds(run, address: str, timeout: float | None = None):
    """Run the Flower gRPC server for the recipe's rounds; returns the FinetuneResult."""
    import time

    import flwr.server as fs

    history: list[dict] = []
    start = time.perf_counter()

    def evaluate(rnd, arrays, config):
        if rnd == 0:
            return None
        run.weights.set(arrays)
        run.global_arrays = [a.copy() for a in arrays]
        rec = {"round": rnd, **run.evaluate_round()}
        history.append(rec)
        run.console.print(f"round {rnd}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()
                                                      if k.endswith("accuracy")))
        return 0.0, {k: v for k, v in rec.items() if isinstance(v, (int, float))}

    strategy = run.strategy(evaluate_fn=evaluate, min_fit_clients=max(1, round(run.f.fraction_fit * run.f.clients)))
    hist = fs.start_server(server_address=address, config=fs.ServerConfig(num_rounds=run.f.rounds,
                                                                           round_timeout=timeout),
                           strategy=strategy)
    fit = dict(hist.metrics_distributed_fit) if hasattr(hist, "metrics_distributed_fit") else {}
    for rec in history:
        for key in ("uplink_bytes", "loss"):
            for rnd, value in fit.get(key, []):
                if rnd == rec["round"]:
                    rec["train_loss" if key == "loss" else key] = value
        rec.setdefault("train_loss", float("nan"))
    return run.finish(history, time.perf_counter() - start)


def register(app: typer.Typer) -> None:
    fed = typer.Typer(help="Federated fine-tuning over Flower's gRPC: one server, N clients.", no_args_is_help=True)
    app.add_typer(fed, name="federated")

    @fed.command("server", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def server_cmd(ctx: typer.Context, recipe: str = typer.Argument(..., help="A recipe with a federated: section."),
                   address: str = typer.Option("127.0.0.1:8080", help="host:port to listen on."),
                   round_timeout: float = typer.Option(0.0, help="Seconds a round waits for clients (0: forever).")
                   ) -> None:
        """Serve the federated rounds; writes the fine-tuned model, federated.json and federated.png to OUT."""
        run = _run(recipe, list(ctx.args))
        result = serve_rounds(run, address, round_timeout or None)
        run.console.print(f"done: {run.f.rounds} rounds; model in {result.out_dir} "
                          f"(report: {result.out_dir}/federated.json)")

    @fed.command("client", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def client_cmd(ctx: typer.Context, recipe: str = typer.Argument(..., help="The server's recipe."),
                   client: int = typer.Option(..., "--client", help="This client's partition, 0..clients-1."),
                   address: str = typer.Option("127.0.0.1:8080", help="The server's host:port.")) -> None:
        """Join a federated run as client K (trains on partition K of the recipe's training split)."""
        from ..errors import RecipeError

        run = _run(recipe, list(ctx.args))
        if not 0 <= client < run.f.clients:
            raise RecipeError(f"--client must be in 0..{run.f.clients - 1}, got {client}")
        from flwr.compat.client.app import start_client

        start_client(server_address=address, client=run.client_cls(run, client).to_client(), insecure=True)
