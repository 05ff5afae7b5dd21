"""`seekformer finetune RECIPE`: multi-task fine-tuning (evaluating its heads is `seekformer eval --task`).

Several processes: `seekformer finetune RECIPE --nproc 2` (or `torchrun --nproc_per_node 2 -m seekformer
finetune RECIPE`); multi-node with --nnodes / --node-rank / --rdzv-endpoint (docs/distributed.md).
"""

from __future__ import annotations

import typer

from . import options as opts


def _console():
    from rich.console import Console

    return Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("finetune", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def finetune_cmd(
        ctx: typer.Context,
        recipe: str = typer.Argument(..., help="A fine-tuning recipe YAML file or a builtin one (finetune_builtin)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUT/checkpoints "
                                    "(written every train.save_every steps and on Ctrl-C)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in an OUT that holds an earlier "
                                       "run's checkpoints (they are deleted)."),
        nproc: opts.Nproc = 1,
        nnodes: opts.Nnodes = 1,
        node_rank: opts.NodeRank = 0,
        rdzv_endpoint: opts.RdzvEndpoint = None,
    ) -> None:
        """Fine-tune a pretrained model on one or more tasks (shared trunk, one head per task).

        Override any key with --section.key value (e.g. --train.steps 50 --weighting.strategy dwa),
        --base DIR / --out DIR, or --tasks.NAME.key value. --nproc N runs it on N processes (the
        global batch and the loss curve stay those of one process).
        """
        from ..distributed.launch import relaunch, wants_launch
        from ..training.finetune import finetune
        from ..training.multitask_recipe import load_finetune_recipe

        r = load_finetune_recipe(recipe, list(ctx.args))
        r.train.resume = r.train.resume or resume
        r.train.overwrite = r.train.overwrite or overwrite
        if wants_launch(nproc, nnodes):
            argv = ["finetune", recipe, *ctx.args] + (["--resume"] if resume else []) \
                + (["--overwrite"] if overwrite else [])
            relaunch(argv, nproc, nnodes, node_rank, rdzv_endpoint, r.check_parallel)
        console = _console()
        result = finetune(r, console=console)
        console.print(f"done: {result.steps} steps in {result.seconds / 60:.1f} min; model in {result.out_dir} "
                      f"(metrics: {result.out_dir}/results.json, plot: {result.out_dir}/finetune.png)")
