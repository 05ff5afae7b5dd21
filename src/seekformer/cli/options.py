"""Options shared by several commands, defined once: `def cmd(temperature: opts.Temperature = 0.7)`.

Each is an `Annotated` type (name, help); the command gives the default. `sampling(...)` turns the sampling
options into the keyword arguments of `inference.generate`.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="Weights: fp32|float32 (default), bf16|bfloat16 or "
                                              "fp16|float16.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: torch's choice).")]

MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy; > 0 samples.")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below min_p * p(top token) (0 = off).")]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty", help="CTRL-style repetition penalty "
                                                  "(1 = off).")]
FrequencyPenalty = Annotated[float, typer.Option("--frequency-penalty", help="OpenAI-style frequency penalty.")]
PresencePenalty = Annotated[float, typer.Option("--presence-penalty", help="OpenAI-style presence penalty.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")]

# several processes (pretrain, finetune): torchrun underneath, see distributed/launch.py and docs/distributed.md
Nproc = Annotated[int, typer.Option("--nproc", help="Processes on this machine (torchrun underneath); the "
                                    "recipe's parallel: section says how they split the work.")]
Nnodes = Annotated[int, typer.Option("--nnodes", help="Machines taking part (multi-node: same command on each).")]
NodeRank = Annotated[int, typer.Option("--node-rank", help="This machine's index, 0 .. nnodes-1.")]
RdzvEndpoint = Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT of the rendezvous "
                                                     "(multi-node).")]


def sampling(max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             seed: int | None = None, stop: list[str] | None = None) -> dict:
    """The sampling options as keyword arguments of `inference.generate.generate/stream`."""
    return dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature, top_k=top_k,
                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, seed=seed,
                stop=tuple(stop or ()))


def set_threads(threads: int | None) -> None:
    """torch.set_num_threads(threads) when given (>= 1, else ConfigError)."""
    if threads is not None:
        import torch

        from ..errors import ConfigError

        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")

        torch.set_num_threads(threads)
