"""`seekformer audit canaries RECIPE`: insert secret canaries, fine-tune as the recipe says, report exposure."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    audit = typer.Typer(help="Privacy audits of fine-tuning runs.", no_args_is_help=True)
    app.add_typer(audit, name="audit")

    @audit.command("canaries", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def canaries_cmd(ctx: typer.Context,
                     recipe: str = typer.Argument(..., help="A fine-tuning recipe with one generation task "
                                                  "(add privacy: for a DP run)."),
                     canaries: int = typer.Option(4, help="Secrets to insert."),
                     repeats: int = typer.Option(8, help="Copies of each secret in the training data."),
                     secret_length: int = typer.Option(6, help="Digits per secret."),
                     candidates: int = typer.Option(500, help="Random secrets each canary is ranked against.")
                     ) -> None:
        """Exposure (Carlini et al. 2019) of canaries inserted into the training data; OUT/canaries.json."""
        from rich.console import Console

        from ..training.multitask_recipe import load_finetune_recipe
        from ..training.privacy.canaries import audit_canaries

        console = Console(stderr=True)
        r = load_finetune_recipe(recipe, list(ctx.args))
        rep = audit_canaries(r, canaries, repeats, secret_length, candidates, console=console)
        for c in rep["canaries"]:
            console.print(f"canary {c['secret']}: rank {c['rank']}/{c['candidates'] + 1}, "
                          f"exposure {c['exposure']:.2f} bits")
        console.print(f"mean exposure {rep['mean_exposure']:.2f} bits (max measurable "
                      f"{rep['max_measurable_exposure']:.2f}); report in {r.out}/canaries.json")
