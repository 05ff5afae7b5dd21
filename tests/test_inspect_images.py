"""`seekformer inspect` on a vision model: which experts image tokens go to versus text tokens, for one
question about an image (--prompt --image) and over many (--images); the batched statistics equal the sum of
one-prompt records; one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from seekformer.interpret.modality import image_examples, inspect_image_prompt, modality_stats
from seekformer.interpret.stats import js_divergence
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.models.vision_lm import SeekForVisionLM, add_image_token, grow_vocab
from seekformer.nn.vision import VisionConfig
from seekformer.tokenizer import SeekTokenizer

from .conftest import run_cli, tiny_config

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from seekformer.data.shapes import write_shapes_vqa

    root = tmp_path_factory.mktemp("inspect-vision")
    tok = SeekTokenizer.train(texts=["what color is the circle? what shape is red? yes no"] * 20, vocab_size=300)
    lm = SeekForCausalLM(tiny_config(vocab_size=tok.vocab_size, num_hidden_layers=3))
    lm.reset_parameters(seed=0)
    tok.save(root / "text")
    lm.save_pretrained(root / "text")
    tid = add_image_token(tok)
    grow_vocab(lm, tok.vocab_size)
    vlm = SeekForVisionLM(lm, VisionConfig.from_preset("vit-nano", image_size=16, pixel_shuffle=True), tid).eval()
    vlm.vision.reset_parameters(seed=1)
    vlm.save_pretrained(root / "vlm", tokenizer=tok)
    write_shapes_vqa(root / "shapes", n_images=10, seed=0, size=16)
    return root


run = run_cli


def test_one_prompt_marks_image_tokens_and_counts_them(dirs, tmp_path, capsys):
    img = dirs / "shapes" / "images" / "000000.png"
    code, out, err = run(capsys, "inspect", dirs / "vlm", "--prompt", "what color is the circle?", "--image", img,
                         "--json", tmp_path / "r.json")
    assert code == 0, err
    rec = json.loads((tmp_path / "r.json").read_text())
    m = rec["modality"]
    n_img = sum(rec["is_image"])
    assert n_img == m["image_tokens"] == 4  # 16 px / patch 4 -> 16 patches -> 4 tokens after pixel shuffle
    assert m["text_tokens"] == len(rec["tokens"]) - n_img > 0
    assert [t for t, f in zip(rec["tokens"], rec["is_image"]) if f] == [f"<image {k}>" for k in range(4)]
    assert [x["layer"] for x in rec["layers"]] == [x["layer"] for x in m["layers"]] == [1, 2]
    for per_token, summary in zip(rec["layers"], m["layers"]):
        # the summary is the per-token routing counted by modality
        for flag, key in ((True, "image_load"), (False, "text_load")):
            counts = torch.zeros(rec["num_experts"])
            for experts, f in zip(per_token["experts"], rec["is_image"]):
                if f == flag:
                    counts[experts] += 1
            assert torch.allclose(counts / counts.sum(), torch.tensor(summary[key]), atol=1e-5)
        assert summary["js_divergence"] == pytest.approx(js_divergence(summary["image_load"], summary["text_load"]),
                                                         abs=1e-5)
        assert 0.0 <= min(summary["image_share"]) and max(summary["image_share"]) <= 1.0
    assert "image tokens -> experts" in out and "JS divergence" in out


def test_image_statistics_equal_summed_prompts(dirs, tmp_path, capsys):
    data = dirs / "shapes" / "train.jsonl"
    code, out, err = run(capsys, "inspect", dirs / "vlm", "--images", data, "--max-examples", "12",
                         "--batch-size", "5", "--json", tmp_path / "s.json")
    assert code == 0, err
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["examples"] == 12
    vlm = SeekForVisionLM.from_pretrained(dirs / "vlm")
    tok = SeekTokenizer.load(dirs / "vlm")
    image_counts, text_counts = torch.zeros(2, 8), torch.zeros(2, 8)  # layers 1, 2 x 8 experts
    n_img = n_text = 0
    for ex in image_examples(data, 12):  # one prompt at a time, no batching
        rec = inspect_image_prompt(vlm, tok, ex["question"], [ex["image"]])
        n_img += rec["modality"]["image_tokens"]
        n_text += rec["modality"]["text_tokens"]
        for li, layer in enumerate(rec["layers"]):
            for experts, f in zip(layer["experts"], rec["is_image"]):
                (image_counts if f else text_counts)[li, experts] += 1
    assert (stats["image_tokens"], stats["text_tokens"]) == (n_img, n_text)
    for li, x in enumerate(stats["layers"]):
        assert torch.allclose(torch.tensor(x["image_load"]), image_counts[li] / image_counts[li].sum(), atol=1e-5)
        assert torch.allclose(torch.tensor(x["text_load"]), text_counts[li] / text_counts[li].sum(), atol=1e-5)
    # an image folder (no questions) works too
    folder = tmp_path / "folder" / "a"
    folder.mkdir(parents=True)
    (folder / "x.png").write_bytes((dirs / "shapes" / "images" / "000001.png").read_bytes())
    got = modality_stats(vlm, tok, image_examples(tmp_path / "folder"))
    assert got["examples"] == 1 and got["image_tokens"] == 4


@pytest.mark.parametrize("args, needle", [
    (("--prompt", "hi", "--image", "MISSING.png"), "image file not found"),
    (("--image", "IMG"), "--image needs --prompt"),
    (("--images", "DATA", "--prompt", "hi"), "goes alone"),
    (("--images", "NOWHERE.jsonl"), "no such file"),
])
def test_bad_input_one_line(dirs, tmp_path, capsys, args, needle):
    args = [str(a).replace("IMG", str(dirs / "shapes" / "images" / "000000.png"))
            .replace("DATA", str(dirs / "shapes" / "train.jsonl")).replace("MISSING", str(tmp_path / "missing"))
            for a in args]
    code, out, err = run(capsys, "inspect", dirs / "vlm", *args)
    assert code == 2 and needle in err and "Traceback" not in err


def test_text_only_model_refuses_images(dirs, capsys):
    img = dirs / "shapes" / "images" / "000000.png"
    code, out, err = run(capsys, "inspect", dirs / "text", "--prompt", "hi", "--image", img)
    assert code == 2 and "text-only" in err
