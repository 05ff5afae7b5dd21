"""`seekformer inspect MODEL_DIR`: routing and attention of a prompt, routing statistics over corpora,
expert ablation (see seekformer.interpret and docs/inspect.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _write_json(path: Optional[Path], data: dict) -> None:
    from ..checkpoint import atomic_write_text

    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data))
        typer.echo(f"wrote {path}", err=True)


def _prompt_mode(model, tok, prompt, add_bos, layers, attention, json_path, out) -> None:
    import numpy as np

    from ..interpret.plots import attention_maps, routing_heatmaps
    from ..interpret.report import inspect_prompt

    ids = tok.encode(prompt, add_bos=add_bos)
    record = inspect_prompt(model, tok, ids, attention=attention, layers=layers,
                            attention_format="full" if attention else "none")
    _write_json(json_path, record)
    if record["note"]:
        typer.echo(f"routing: {record['note']}")
    for layer in record["layers"]:
        used = sorted({e for row in layer["experts"] for e in row})
        typer.echo(f"layer {layer['layer']}: {len(ids)} tokens routed to {len(used)} of {record['num_experts']} "
                   f"experts; top experts of the last token {layer['experts'][-1]}")
    if out is not None:
        paths = routing_heatmaps(record, out)
        if attention:
            atts = {i: np.asarray(a, dtype=np.float32) for i, a in zip(record["attention_layers"], record["attention"])}
            paths += attention_maps(record["tokens"], atts, out)
        typer.echo(f"wrote {len(paths)} PNG files to {out}", err=True)


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        model_dir: Path = typer.Argument(..., help="Model directory (config.json, safetensors, tokenizer.json)."),
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text whose routing and attention to show."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write PNG heatmaps into this folder."),
        layer: Optional[list[int]] = typer.Option(None, "--layer", help="Only these layers (repeatable; from 0)."),
        attention: bool = typer.Option(True, help="Capture attention probabilities (prompt mode)."),
        add_bos: bool = typer.Option(True, help="Prepend the begin-of-text token to the prompt."),
        corpus: Optional[str] = typer.Option(None, "--corpus", help="Routing statistics over this text: builtin, "
                                             "builtin:shakespeare|sotu|moby_dick, a file or folder, hf:NAME[:SPLIT]."),
        compare: Optional[str] = typer.Option(None, "--compare", help="A second corpus: JS divergence of loads."),
        ablate_experts: bool = typer.Option(False, "--ablate-experts",
                                            help="With --corpus: loss increase when each expert is ablated."),
        ablate_mode: str = typer.Option("zero", "--ablate-mode", help="zero (drop its output) or reroute."),
        max_tokens: int = typer.Option(20000, "--max-tokens", min=2, help="Tokens read per corpus at most."),
        window: Optional[int] = typer.Option(None, "--window", min=2,
                                             help="Tokens per forward (default: 256 or the model context)."),
        batch_size: int = typer.Option(8, "--batch-size", min=1),
        text_key: str = typer.Option("text", "--text-key", help="Field of .jsonl / hf records holding the text."),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
        dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
        image: Optional[list[Path]] = typer.Option(None, "--image", help="With --prompt, a vision model: an image the "
                                                   "question is about (repeatable); image vs text routing."),
        images: Optional[Path] = typer.Option(None, "--images", help="A vision model: image vs text routing over a "
                                              "jsonl of {image[, question]} records or an image folder."),
        max_examples: int = typer.Option(500, "--max-examples", min=1, help="With --images: examples read at most."),
    ) -> None:
        """Show what the experts and attention heads do: one prompt (--prompt, with --image for a vision model),
        a corpus (--corpus), or image vs text tokens over many images (--images)."""
        from ..interpret.capture import InspectError

        if (compare or ablate_experts) and corpus is None:
            raise InspectError("--compare and --ablate-experts need --corpus SOURCE")
        if images is not None or image:
            if images is not None and (image or prompt is not None or corpus is not None):
                raise InspectError("--images (statistics over many images) goes alone: not with --prompt, --image "
                                   "or --corpus")
            if image and prompt is None:
                raise InspectError("--image needs --prompt TEXT (the question about the image)")
            _image_mode(model_dir, device, dtype, prompt, list(image or []), images, max_examples, layer, batch_size,
                        json_path)
            return
        from ..inference.chat import load_model_and_tokenizer
        from ..interpret.capture import check_layers

        if (prompt is None) == (corpus is None):
            raise InspectError("give either --prompt TEXT (one text), --corpus SOURCE (statistics) or, for a "
                               "vision model, --images SOURCE")
        model, tok = load_model_and_tokenizer(model_dir, device, dtype)
        layers = check_layers(model, layer) if layer else None
        if prompt is not None:
            if not prompt:
                raise InspectError("empty prompt: pass --prompt TEXT")
            _prompt_mode(model, tok, prompt, add_bos, layers, attention, json_path, out)
            return
        _corpus_mode(model, tok, corpus, compare, ablate_experts, ablate_mode, layers, max_tokens, window,
                     batch_size, text_key, json_path, out)


def _print_modality(summary: dict) -> None:
    typer.echo(f"{summary['image_tokens']} image tokens, {summary['text_tokens']} text tokens "
               f"(image share {summary['image_token_share']:.3f})")
    for x in summary["layers"]:
        js = "n/a" if x["js_divergence"] is None else f"{x['js_divergence']:.3f}"
        fav = max(range(len(x["image_share"])), key=lambda e: x["image_share"][e])
        typer.echo(f"layer {x['layer']}: image tokens -> experts {x['top_image_experts']}, text tokens -> "
                   f"{x['top_text_experts']}; JS divergence {js} bits; most image-heavy expert {fav} "
                   f"({x['image_share'][fav]:.2f} of its tokens are image tokens)")


def _image_mode(model_dir, device, dtype, prompt, image, images, max_examples, layer, batch_size, json_path) -> None:
    from ..inference.vision import load_vision_model
    from ..interpret.modality import image_examples, inspect_image_prompt, modality_stats

    vlm, tok = load_vision_model(model_dir, device, dtype)
    if prompt is not None:
        record = inspect_image_prompt(vlm, tok, prompt, image, layers=layer)
        summary = record["modality"]
    else:
        record = summary = modality_stats(vlm, tok, image_examples(images, max_examples), batch_size, layers=layer)
        typer.echo(f"{images}: {summary['examples']} examples")
    _print_modality(summary)
    _write_json(json_path, record)


def _corpus_mode(model, tok, corpus, compare, ablate, mode, layers, max_tokens, window, batch_size, text_key,
                 json_path, out) -> None:
    from ..interpret.ablation import ablation_report
    from ..interpret.capture import InspectError, moe_layer_ids
    from ..interpret.plots import ablation_heatmap, load_histograms
    from ..interpret.stats import compare_stats, corpus_documents, routing_stats, token_windows

    if not moe_layer_ids(model):
        raise InspectError("this model is dense (no MoE layer): there is no routing to measure")
    ctx = int(model.config.max_position_embeddings)
    window = window or min(256, ctx)
    if window > ctx:
        raise InspectError(f"--window {window} exceeds the model context {ctx}: use --window {ctx} or less")

    def windows_of(source: str):
        return token_windows(tok, corpus_documents(source, text_key), window, max_tokens)

    if ablate:
        report = ablation_report(model, windows_of(corpus), layers=layers, mode=mode, batch_size=batch_size,
                                 progress=lambda s: typer.echo(f"  ablating {s}", err=True))
        report["corpus"] = corpus
        for row in report["layers"]:
            worst = max(row["experts"], key=lambda x: x["delta"])
            typer.echo(f"layer {row['layer']}: baseline {report['baseline_loss']:.4f}; largest increase "
                       f"+{worst['delta']:.4f} (expert {worst['expert']}, load {worst['load']:.3f}); deltas "
                       + " ".join(f"{x['delta']:+.3f}" for x in row["experts"]))
        _write_json(json_path, report)
        if out is not None:
            typer.echo(f"wrote {ablation_heatmap(report, out)}", err=True)
        return
    result = {"corpora": {corpus: routing_stats(model, windows_of(corpus), batch_size)}}
    if compare is not None:
        result["corpora"][compare] = routing_stats(model, windows_of(compare), batch_size)
        result["comparison"] = compare_stats(result["corpora"][corpus], result["corpora"][compare])
    if layers is not None:
        for s in result["corpora"].values():
            s["layers"] = [x for x in s["layers"] if x["layer"] in layers]
    for name, s in result["corpora"].items():
        typer.echo(f"{name}: {s['tokens']} tokens")
        for x in s["layers"]:
            typer.echo(f"  layer {x['layer']}: entropy/logE {x['entropy_norm']:.3f}  max/mean {x['max_over_mean']:.2f}"
                       f"  min/mean {x['min_over_mean']:.2f}  same-expert {x['same_expert_rate']:.3f} "
                       f"(chance {x['same_expert_chance']:.3f})")
    if "comparison" in result:
        c = result["comparison"]
        typer.echo(f"JS divergence {corpus} vs {compare} (bits): mean {c['mean_js_divergence']:.4f}; "
                   + " ".join(f"L{x['layer']} {x['js_divergence']:.4f}" for x in c["layers"]))
    _write_json(json_path, result)
    if out is not None:
        typer.echo(f"wrote {load_histograms(result['corpora'], out)}", err=True)
