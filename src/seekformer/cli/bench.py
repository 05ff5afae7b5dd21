"""`seekformer bench ...`: time seekformer against `transformers` on the same machine, in one run.

Each benchmark is one command of `bench_app` here (`train`, `decode`, `serve`); the measuring code lives in
`seekformer.bench.<name>`. Add more with `@bench_app.command("name")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import SeekformerError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: seekformer vs transformers, same config and machine.")


@bench_app.command("train")
def train(
    preset: Optional[list[str]] = typer.Option(None, "--preset", help="Model preset (repeatable; default: tiny and small)."),
    dtype: Optional[list[str]] = typer.Option(None, "--dtype", help="fp32|float32 or bf16|bfloat16 autocast (repeatable; default both)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per step."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence."),
    steps: int = typer.Option(10, "--steps", help="Timed steps per model (after 2 warm-up steps)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for both (default: torch's choice)."),
    out: Path = typer.Option(Path("benchmarks/results/train.md"), "--out", help="Markdown table to write."),
    tune_malloc: bool = typer.Option(False, "--tune-malloc", help="Keep freed memory in the heap (glibc), both models."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=INT config override for every preset "
                                             "(repeatable), e.g. --set n_routed_experts=16 --set num_experts_per_tok=4."),
) -> None:
    """Training-step tokens/s and MFU of seekformer and transformers' DeepseekV3 (forward, backward, AdamW)."""
    from ..bench.train import run_train_bench
    from ..config import PRESETS
    from ..errors import ConfigError

    from ..models.loading import parse_dtype, short_dtype_name

    dtypes = [short_dtype_name(parse_dtype(d, allowed=("fp32", "bf16"))) for d in dtype or ["fp32", "bf16"]]
    presets = preset or ["tiny", "small"]
    for p in presets:
        if p not in PRESETS:
            raise ConfigError(f"unknown preset {p!r}; choose from: {', '.join(PRESETS)}")
    run_train_bench(presets=presets, dtypes=dtypes, batch_size=batch_size, seq_len=seq_len,
                    steps=steps, threads=threads, out_md=out, log=typer.echo, tune_malloc=tune_malloc,
                    overrides=_int_overrides(set_ or []))


@bench_app.command("decode")
def bench_decode_cmd(
    preset: Optional[list[str]] = typer.Option(None, "--preset", help="Model preset (repeatable; default: tiny and small)."),
    model_dir: Optional[list[Path]] = typer.Option(None, "--model-dir", help="Also a trained model directory "
                                                   "(repeatable); with MTP modules, speculative decoding is timed."),
    batch_size: Optional[list[int]] = typer.Option(None, "--batch-size", help="Batch size (repeatable; default 1 and 8)."),
    prompt_len: Optional[list[int]] = typer.Option(None, "--prompt-len", help="Prompt tokens (repeatable; default "
                                                   "32 and 512)."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens generated per row."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per setting (median)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32|float32 or bf16|bfloat16 (weights and cache)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for both (default: torch's choice)."),
    prompt: str = typer.Option("The United States", "--prompt", help="Prompt for the speculative run on a trained model."),
    drafts: Optional[list[int]] = typer.Option(None, "--drafts", min=1, help="Speculative drafts per step to time "
                                               "on a trained model with MTP (repeatable; default: the MTP depth)."),
    llama_cpp: bool = typer.Option(True, "--llama-cpp/--no-llama-cpp", help="Compare a --model-dir with llama.cpp "
                                   "on its F32 GGUF export (batch 1; needs llama-cpp-python)."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="Also time seekformer's compiled decoding "
                                 "step (torch.compile), interleaved with the eager one."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=INT config override for every preset "
                                             "(repeatable), e.g. --set n_routed_experts=16 --set num_experts_per_tok=4."),
    out: Path = typer.Option(Path("benchmarks/results/decode.md"), "--out", help="Markdown table to write."),
) -> None:
    """Decode tokens/s (batch 1 and 8) and KV-cache bytes/token of seekformer and transformers generate()."""
    from ..bench.decode import run_decode_bench
    from ..config import PRESETS
    from ..errors import ConfigError
    from ..models.loading import parse_dtype, short_dtype_name

    dtype = short_dtype_name(parse_dtype(dtype, allowed=("fp32", "bf16")))

    presets = preset if preset is not None else ([] if model_dir else ["tiny", "small"])
    for p in presets:
        if p not in PRESETS:
            raise ConfigError(f"unknown preset {p!r}; choose from: {', '.join(PRESETS)}")
    if model_dir:
        from ..checkpoint import check_model_dir

        for d in model_dir:
            check_model_dir(d)
    run_decode_bench(presets=presets, model_dirs=model_dir or [], batch_sizes=batch_size or [1, 8],
                     prompt_lens=prompt_len or [32, 512], new_tokens=new_tokens, repeats=repeats, dtype=dtype,
                     threads=threads, prompt_text=prompt, out_md=out, log=typer.echo,
                     draft_counts=drafts or [None], llama_cpp=llama_cpp, compile=compile,
                     overrides=_int_overrides(set_ or []))


def _int_overrides(items: list[str]) -> dict[str, int]:
    """["KEY=INT", ...] -> {KEY: INT}; ConfigError for anything else."""
    from ..config import SeekConfig
    from ..errors import ConfigError

    out = {}
    fields = SeekConfig.__dataclass_fields__
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"--set takes KEY=INT with a config field as KEY, got {item!r}")
        out[key] = int(value)
    return out


@bench_app.command("serve")
def bench_serve_cmd(
    model_dir: Optional[Path] = typer.Argument(None, help="Model directory (default: ./seekformer-quickstart if it "
                                               "exists, else a random `tiny`-preset model)."),
    clients: Optional[list[int]] = typer.Option(None, "--clients", help="Concurrency levels (repeatable; "
                                                "default 1, 4, 16)."),
    requests: int = typer.Option(4, "--requests", min=1, help="Requests per client at each level."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens generated per request."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads of the server."),
    url: Optional[str] = typer.Option(None, "--url", help="Measure a running server instead (model name: "
                                      "--model-name)."),
    model_name: str = typer.Option("bench", "--model-name", help="Model name of the server at --url."),
    out: Path = typer.Option(Path("benchmarks/results/serve.md"), "--out", help="Markdown table to write."),
) -> None:
    """Serving throughput: aggregate tokens/s and p50/p95 latency with 1, 4 and 16 concurrent clients."""
    from ..runtime import prefer_passive_openmp

    if url is None:
        prefer_passive_openmp()  # inherited by the server subprocess: it runs as `seekformer serve` does
    from ..bench.report import command_line, write_report
    from ..bench.serve import markdown, run_serve_bench

    levels = tuple(sorted(set(clients or [1, 4, 16])))
    if levels[0] < 1:
        raise SeekformerError("--clients must be >= 1")
    rows, info = run_serve_bench(model_dir, levels, requests, max_tokens, threads, url, model_name)
    md = markdown(rows, info, command_line("serve"))
    typer.echo(md)
    typer.echo(f"written to {write_report(out, md)}", err=True)


# ---- `seekformer bench compress` (compress worker; the command lives in cli/compress.py)
from .compress import bench_compress_cmd  # noqa: E402

bench_app.command("compress")(bench_compress_cmd)
# ---- end of `bench compress`


@bench_app.command("distributed")
def distributed(
    preset: str = typer.Option("tiny", "--preset", help="Model preset."),
    steps: int = typer.Option(30, "--steps", help="Training steps per configuration."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(16, "--batch-size", help="Global batch (sequences per step)."),
    threads: int = typer.Option(2, "--threads", help="CPU threads in all: 1 process x T, or P processes x T/P."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Rounds; the configurations are interleaved in each."),
    out: Path = typer.Option(Path("benchmarks/results/distributed.md"), "--out", help="Markdown table to write."),
) -> None:
    """Tokens/s of 1 process vs 2 processes (DDP, FSDP2, FSDP2 + expert parallel) on this machine, as ratios."""
    from ..bench.distributed import run_distributed_bench, to_markdown, with_notes
    from ..bench.report import command_line, write_report

    res = run_distributed_bench(preset=preset, steps=steps, seq_len=seq_len, batch_size=batch_size, threads=threads,
                                rounds=rounds)
    md = to_markdown(res, command_line("distributed"))
    typer.echo(md)
    write_report(out, with_notes(md, out.read_text() if out.is_file() else None))


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
