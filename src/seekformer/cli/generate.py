"""`seekformer generate MODEL_DIR --prompt TEXT` and `seekformer chat MODEL_DIR`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from . import options as opts


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @opts.with_sampling(max_new_tokens=64, temperature=0.0, top_p=1.0)
    def generate_cmd(
        model_dir: Path = typer.Argument(..., help="Model directory (config.json, safetensors, tokenizer.json)."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text ('-' reads stdin)."),
        options: Optional[dict] = None,  # the sampling options (@opts.with_sampling)
        num_beams: int = typer.Option(1, help="Beam search with this many beams (greedy scoring)."),
        length_penalty: float = typer.Option(1.0, help="Beam search length penalty exponent."),
        speculative: bool = typer.Option(False, help="Greedy self-speculative decoding with the MTP modules."),
        speculative_tokens: Optional[int] = typer.Option(None, "--speculative-tokens", min=1, max=7,
                                                         help="Drafts per step with --speculative (default: the "
                                                         "model's MTP depth; more chain the last MTP module)."),
        cache_mode: str = typer.Option("latent", help="KV cache layout: latent (absorbed MLA) or naive."),
        add_bos: bool = typer.Option(True, help="Prepend the begin-of-text token."),
        echo: bool = typer.Option(False, help="Print the prompt before the continuation."),
        stats: bool = typer.Option(False, help="Print tokens/s (and speculative acceptance) to stderr."),
        device: opts.Device = "cpu",
        dtype: opts.Dtype = None,
        threads: opts.Threads = None,
        compile: opts.Compile = False,
        image: Optional[list[Path]] = typer.Option(None, "--image", help="An image the prompt asks about (repeatable; "
                                                   "a model with a vision tower; the prompt is a chat user message)."),
    ) -> None:
        """Continue a prompt; the text streams as it is generated. Ctrl-C stops (exit 130)."""
        from ..errors import GenerationError
        from ..inference.generate import generate, stream
        from ..models.loading import load_model_and_tokenizer

        opts.set_threads(threads)
        opts.set_compile(compile)
        if prompt == "-":
            prompt = sys.stdin.read()
        if not prompt:
            raise GenerationError("empty prompt: pass --prompt TEXT")
        if image:  # inference/vision.py
            from ..inference.vision import load_vision_model, stream_with_images

            vlm, vtok = load_vision_model(model_dir, device, dtype)
            for piece in stream_with_images(vlm, vtok, prompt, list(image), **options):
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
            for piece in stream(model, tok, ids, cache_mode=cache_mode, info=done, **options):
                sys.stdout.write(piece)
                sys.stdout.flush()
            out_tokens = done["new_tokens"]
        else:
            out = generate(model, [ids], tokenizer=tok, num_beams=num_beams, length_penalty=length_penalty,
                           speculative=speculative, num_speculative_tokens=speculative_tokens,
                           cache_mode=cache_mode, return_dict=True, **options)
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
    @opts.with_sampling(max_new_tokens=256, temperature=0.7, top_p=0.95)
    def chat_cmd(
        model_dir: Path = typer.Argument(..., help="Model directory (config.json, safetensors, tokenizer.json)."),
        system: Optional[str] = typer.Option(None, help="System message."),
        options: Optional[dict] = None,  # the sampling options (@opts.with_sampling)
        device: opts.Device = "cpu",
        dtype: opts.Dtype = None,
        threads: opts.Threads = None,
        compile: opts.Compile = False,
    ) -> None:
        """Chat interactively (chat template, streamed replies). Commands: /reset, /exit, /image PATH.

        Ctrl-C stops the current reply; at the prompt it (or Ctrl-D) ends the session.
        """
        from ..errors import GenerationError, SeekformerError
        from ..inference.chat import ChatSession
        from ..models.loading import load_model_and_tokenizer
        from ..models.vision_lm import is_vision_dir

        opts.set_threads(threads)
        opts.set_compile(compile)
        if is_vision_dir(model_dir):  # a model with a vision tower: /image PATH attaches an image
            from ..inference.vision import VisionChatSession, load_vision_model

            vlm, tok = load_vision_model(model_dir, device, dtype)
            session = VisionChatSession(vlm, tok, system=system, **options)
        else:
            model, tok = load_model_and_tokenizer(model_dir, device, dtype)
            session = ChatSession(model, tok, system=system, **options)
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
            reply: list[str] = []
            try:
                for piece in session.send(line):
                    reply.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except GenerationError as e:
                typer.echo(f"error: {e}", err=True)
                continue
            except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session; keep what was said
                if session.messages and session.messages[-1]["role"] == "user":
                    session.messages.append({"role": "assistant", "content": "".join(reply)})
                typer.echo("\n(reply interrupted)", err=True)
            sys.stdout.write("\n")
            sys.stdout.flush()
