"""Options shared by several commands, defined once: `def cmd(temperature: opts.Temperature = 0.7)`.

Each is an `Annotated` type (name, help); the command gives the default. `@with_sampling(temperature=0.7)`
adds all the sampling options to a command at once (with that command's defaults) and hands the command
`options`: the keyword arguments of `inference.generate` (what `sampling(...)` makes of them).
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any, Callable, Optional

import typer

Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="Weights: fp32|float32 (default), bf16|bfloat16 or "
                                              "fp16|float16.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: torch's choice).")]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="Compile the decoding step with "
                                       "torch.compile (faster steps after a one-off compilation of seconds to "
                                       "minutes, cached on disk; eager fallback with a warning).")]

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


# (name, option type, default) of every sampling option, in --help order
SAMPLING_OPTIONS: list[tuple[str, Any, Any]] = [
    ("max_new_tokens", MaxNewTokens, 64), ("temperature", Temperature, 0.0), ("top_k", TopK, 0),
    ("top_p", TopP, 1.0), ("min_p", MinP, 0.0), ("repetition_penalty", RepetitionPenalty, 1.0),
    ("frequency_penalty", FrequencyPenalty, 0.0), ("presence_penalty", PresencePenalty, 0.0),
    ("seed", Seed, None), ("stop", Stop, None)]


def with_sampling(**defaults: Any) -> Callable[[Callable], Callable]:
    """Decorator: add the sampling options (`SAMPLING_OPTIONS`; `defaults` overrides their defaults) to a
    typer command after its own parameters; the command receives them as one `options` dict (keyword
    arguments of `inference.generate`) and declares `options: dict` instead of the ten parameters."""
    unknown = set(defaults) - {name for name, _, _ in SAMPLING_OPTIONS}
    if unknown:
        raise TypeError(f"unknown sampling options {sorted(unknown)}")

    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command, eval_str=True)
        if "options" not in own.parameters:
            raise TypeError(f"{command.__name__} must take an `options` parameter")
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(name, default),
                                   annotation=kind) for name, kind, default in SAMPLING_OPTIONS]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            chosen = {name: kwargs.pop(name) for name, _, _ in SAMPLING_OPTIONS}
            return command(*args, options=sampling(**chosen), **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own.parameters.values() if p.name != "options"]
        wrapper.__signature__ = own.replace(parameters=params + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params + added}
        return wrapper

    return decorate


def set_compile(on: bool) -> None:
    """The process default of compiled decoding steps (inference/compiled.py) from --compile."""
    from ..inference.compiled import set_compile as _set

    _set(on)


def _set_product_form() -> None:
    """Decoding steps' few-row product form: measured per model ("auto"), unless SEEKFORMER_FEW_ROWS=on|off."""
    import os

    from ..errors import ConfigError
    from ..runtime import set_product_form

    value = os.environ.get("SEEKFORMER_FEW_ROWS", "auto").strip().lower()
    choices = {"auto": "auto", "on": True, "off": False}
    if value not in choices:
        raise ConfigError(f"SEEKFORMER_FEW_ROWS must be auto, on or off, got {value!r}")
    set_product_form(choices[value])


def set_threads(threads: int | None) -> None:
    """torch.set_num_threads(threads) when given (>= 1, else ConfigError); otherwise few-row decoding steps
    choose their thread count by measurement (runtime.set_decode_threads("auto")); their product form is
    measured too (runtime.set_product_form("auto"), or SEEKFORMER_FEW_ROWS=on|off)."""
    from ..runtime import set_decode_threads

    set_decode_threads("auto" if threads is None else None)
    _set_product_form()
    if threads is not None:
        import torch

        from ..errors import ConfigError

        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")

        torch.set_num_threads(threads)
