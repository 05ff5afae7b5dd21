"""`seekformer generate MODEL_DIR --prompt TEXT` and `seekformer chat MODEL_DIR`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer


def _setup(threads: Optional[int]) -> None:
    import torch

    from ..errors import GenerationError

    if threads is not None:
        if threads < 1:
            raise GenerationError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
              presence_penalty, seed, stop) -> dict:
    return dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature, top_k=top_k,
                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, seed=seed,
                stop=tuple(stop or ()))


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        model_dir: Path = typer.Argument(..., help="Model directory (config.json, safetensors, tokenizer.json)."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text ('-' reads stdin)."),
        max_new_tokens: int = typer.Option(64, help="Tokens to generate at most."),
        temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
        top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0 = off)."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
        min_p: float = typer.Option(0.0, help="Drop tokens below min_p * p(top token) (0 = off)."),
        repetition_penalty: float = typer.Option(1.0, help="CTRL-style repetition penalty (1 = off)."),
        frequency_penalty: float = typer.Option(0.0, help="OpenAI-style frequency penalty."),
        presence_penalty: float = typer.Option(0.0, help="OpenAI-style presence penalty."),
        seed: Optional[int] = typer.Option(None, help="Seed for reproducible sampling."),
        stop: Optional[list[str]] = typer.Option(None, help="Stop string (repeatable)."),
        num_beams: int = typer.Option(1, help="Beam search with this many beams (greedy scoring)."),
        length_penalty: float = typer.Option(1.0, help="Beam search length penalty exponent."),
        speculative: bool = typer.Option(False, help="Greedy self-speculative decoding with the MTP modules."),
        cache_mode: str = typer.Option("latent", help="KV cache layout: latent (absorbed MLA) or naive."),
        add_bos: bool = typer.Option(True, help="Prepend the begin-of-text token."),
        echo: bool = typer.Option(False, help="Print the prompt before the continuation."),
        stats: bool = typer.Option(False, help="Print tokens/s (and speculative acceptance) to stderr."),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
        dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
        threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's choice)."),
        image: Optional[list[Path]] = typer.Option(None, "--image", help="An image the prompt asks about (repeatable; "
                                                   "a model with a vision tower; the prompt is a chat user message)."),
    ) -> None:
        """Continue a prompt; the text streams as it is generated."""
        from ..errors import GenerationError
        from ..inference.chat import load_model_and_tokenizer
        from ..inference.generate import generate, stream

        _setup(threads)
        if prompt == "-":
            prompt = sys.stdin.read()
        if not prompt:
            raise GenerationError("empty prompt: pass --prompt TEXT")
        opts = _sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                         presence_penalty, seed, stop)
        if image:  # inference/vision.py
            from ..inference.vision import load_vision_model, stream_with_images

            vlm, vtok = load_vision_model(model_dir, device, dtype)
            for piece in stream_with_images(vlm, vtok, prompt, list(image), **opts):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return
        model, tok = load_model_and_tokenizer(model_dir, device, dtype)
        ids = tok.encode(prompt, add_bos=add_bos)
        if echo:
            typer.echo(prompt, nl=False)
        if num_beams < 1:
            raise GenerationError(f"--num-beams must be >= 1, got {num_beams}")
        t0 = time.perf_counter()
        info = ""
        if num_beams == 1 and not speculative:
            done: dict = {}
            for piece in stream(model, tok, ids, cache_mode=cache_mode, info=done, **opts):
                sys.stdout.write(piece)
                sys.stdout.flush()
            out_tokens = done["new_tokens"]
        else:
            out = generate(model, [ids], tokenizer=tok, num_beams=num_beams, length_penalty=length_penalty,
                           speculative=speculative, cache_mode=cache_mode, return_dict=True, **opts)
            sys.stdout.write(out.texts[0])
            out_tokens = len(out.new_tokens[0])
            if speculative:
                info = f", acceptance {out.stats['acceptance_rate']:.1%}, " \
                       f"{out.stats['tokens_per_forward']:.2f} tokens/forward"
        sys.stdout.write("\n")
        if stats:
            dt = time.perf_counter() - t0
            typer.echo(f"[{out_tokens} tokens in {dt:.2f}s, {out_tokens / dt:.1f} tokens/s{info}]", err=True)

    @app.command("chat")
    def chat_cmd(
        model_dir: Path = typer.Argument(..., help="Model directory (config.json, safetensors, tokenizer.json)."),
        system: Optional[str] = typer.Option(None, help="System message."),
        max_new_tokens: int = typer.Option(256, help="Tokens per reply at most."),
        temperature: float = typer.Option(0.7, help="0 = greedy; > 0 samples."),
        top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0 = off)."),
        top_p: float = typer.Option(0.95, help="Nucleus sampling mass (1 = off)."),
        min_p: float = typer.Option(0.0, help="Drop tokens below min_p * p(top token) (0 = off)."),
        repetition_penalty: float = typer.Option(1.0, help="CTRL-style repetition penalty (1 = off)."),
        seed: Optional[int] = typer.Option(None, help="Seed for reproducible sampling."),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
        dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
        threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's choice)."),
    ) -> None:
        """Chat interactively (chat template, streamed replies). Commands: /reset, /exit, /image PATH."""
        from ..errors import GenerationError, SeekformerError
        from ..inference.chat import ChatSession, load_model_and_tokenizer
        from ..models.vision_lm import is_vision_dir

        _setup(threads)
        opts = _sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, 0.0, 0.0, seed, None)
        if is_vision_dir(model_dir):  # a model with a vision tower: /image PATH attaches an image
            from ..inference.vision import VisionChatSession, load_vision_model

            vlm, tok = load_vision_model(model_dir, device, dtype)
            session = VisionChatSession(vlm, tok, system=system, **opts)
        else:
            model, tok = load_model_and_tokenizer(model_dir, device, dtype)
            session = ChatSession(model, tok, system=system, **opts)
        interactive = sys.stdin.isatty()
        if interactive:
            typer.echo("chat: /reset clears the conversation, /exit quits", err=True)
        while True:
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                break
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                session.reset()
                typer.echo("(conversation cleared)")
                continue
            if cmd.startswith("/image"):
                if not hasattr(session, "add_image"):
                    typer.echo("error: this is a text-only model (no vision tower); it cannot read images", err=True)
                    continue
                try:
                    session.add_image(cmd[len("/image"):].strip())
                    typer.echo("(image attached to the next message)", err=True)
                except SeekformerError as e:
                    typer.echo(f"error: {e}", err=True)
                continue
            if cmd.startswith("/"):
                typer.echo(f"unknown command {cmd}: use /reset, /image PATH or /exit", err=True)
                continue
            try:
                for piece in session.send(line):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except GenerationError as e:
                typer.echo(f"error: {e}", err=True)
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()


def bench_decode_cmd(
    preset: Optional[list[str]] = typer.Option(None, "--preset", help="Model preset (repeatable; default: tiny and small)."),
    model_dir: Optional[list[Path]] = typer.Option(None, "--model-dir", help="Also a trained model directory "
                                                   "(repeatable); with MTP modules, speculative decoding is timed."),
    batch_size: Optional[list[int]] = typer.Option(None, "--batch-size", help="Batch size (repeatable; default 1 and 8)."),
    prompt_len: Optional[list[int]] = typer.Option(None, "--prompt-len", help="Prompt tokens (repeatable; default "
                                                   "32 and 512)."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens generated per row."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per setting (median)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16 (weights and cache)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for both (default: torch's choice)."),
    prompt: str = typer.Option("The United States", "--prompt", help="Prompt for the speculative run on a trained model."),
    out: Path = typer.Option(Path("benchmarks/results/decode.md"), "--out", help="Markdown table to write."),
) -> None:
    """Decode tokens/s (batch 1 and 8) and KV-cache bytes/token of seekformer and transformers generate()."""
    from ..bench.decode import run_decode_bench
    from ..config import PRESETS
    from ..errors import ConfigError

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
                     threads=threads, prompt_text=prompt, out_md=out, log=typer.echo)
