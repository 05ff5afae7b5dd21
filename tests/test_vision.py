"""Vision: encoder/projector shapes, image loading and bad input, vision model save/load, CLI errors."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from seekformer.data.images import (ImageError, ImageTooLarge, decode_data_url, load_image, normalize,
                                    read_image_records)
from seekformer.data.shapes import write_digits, write_shapes_vqa
from seekformer.errors import RecipeError, TaskError
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.models.vision_lm import (IMAGE_TOKEN, SeekForVisionLM, SeekForVisionMultiTask, add_image_token,
                                         expand_image_markers, grow_vocab)
from seekformer.nn.vision import VisionConfig, VisionTower, pixel_shuffle, splice_image_tokens
from seekformer.tokenizer import SeekTokenizer

from .conftest import tiny_config

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def png_bytes(mode: str = "RGB", size=(12, 10), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    c = color if mode in ("RGB",) else (color + (128,) if mode == "RGBA" else color[0])
    Image.new(mode, size, c).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------- nn
def test_tower_shapes_and_pixel_shuffle():
    cfg = VisionConfig.from_preset("vit-nano", image_size=16, channels=1, lm_hidden_size=48)
    tower = VisionTower(cfg)
    out = tower(torch.randn(3, 1, 16, 16))
    assert out.shape == (3, cfg.num_image_tokens, 48) and cfg.num_image_tokens == 16
    cfg2 = VisionConfig.from_preset("vit-tiny", image_size=16, pixel_shuffle=True, lm_hidden_size=32)
    assert VisionTower(cfg2)(torch.randn(2, 3, 16, 16)).shape == (2, 4, 32)
    # pixel shuffle merges each 2x2 block of the patch grid (not arbitrary groups of 4 tokens)
    x = torch.arange(16).float().view(1, 16, 1)  # grid 4x4, patch id as the feature
    merged = pixel_shuffle(x, 4)
    assert merged.shape == (1, 4, 4) and merged[0, 0].tolist() == [0, 1, 4, 5]
    with pytest.raises(Exception, match="multiple of patch_size"):
        VisionConfig.from_preset("vit-nano", image_size=18)


def test_conv_stem_layers_and_old_configs():
    cfg = VisionConfig.from_preset("vit-tiny", image_size=16, pixel_shuffle=True, lm_hidden_size=32, stem_layers=3)
    tower = VisionTower(cfg)
    convs = [m for m in tower.encoder.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert cfg.stem_layers == 3 and len(convs) == 3 and tower(torch.randn(2, 3, 16, 16)).shape == (2, 4, 32)
    # a vision.json written before stem_layers existed still loads (one stem conv, same weight names)
    old = {k: v for k, v in VisionConfig.from_preset("vit-tiny").to_dict().items() if k != "stem_layers"}
    assert VisionConfig.from_dict(old).stem_layers == 1
    assert "encoder.patch_embed.stem.0.weight" in VisionTower(VisionConfig.from_dict(old)).state_dict()
    with pytest.raises(Exception, match="stem_layers"):
        VisionConfig.from_preset("vit-tiny", stem_layers=0)
    # ... and before token_positions: no slot embedding, no new weight
    old = {k: v for k, v in VisionConfig.from_preset("vit-tiny").to_dict().items() if k != "token_positions"}
    assert "projector.pos" not in VisionTower(VisionConfig.from_dict(old)).state_dict()


def test_token_positions_add_one_embedding_per_slot():
    cfg = VisionConfig.from_preset("vit-nano", image_size=16, pixel_shuffle=True, lm_hidden_size=24,
                                   token_positions=True)
    tower = VisionTower(cfg).eval()
    assert tower.projector.pos.shape == (1, cfg.num_image_tokens, 24) and float(tower.projector.pos.detach().std()) > 0
    pix = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        with_pos = tower(pix)
        base = tower.projector.fc2(torch.nn.functional.gelu(tower.projector.fc1(tower.projector.norm(
            pixel_shuffle(tower.encoder(pix), cfg.grid)))))
    assert torch.allclose(with_pos - base, tower.projector.pos.expand(2, -1, -1), atol=1e-6)


def test_global_token_summarises_the_whole_map_first():
    cfg = VisionConfig.from_preset("vit-nano", image_size=16, pixel_shuffle=True, lm_hidden_size=24, global_token=True)
    assert cfg.num_image_tokens == 4 + 1
    tower = VisionTower(cfg).eval()
    pix = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out, feats = tower(pix), tower.encoder(pix)
        assert out.shape == (2, 5, 24)
        assert torch.allclose(out[:, 0], tower.projector.glob(feats.flatten(1)), atol=1e-6)
        # the summary token sees every patch: changing one corner patch's features changes it
        moved = feats.clone()
        moved[:, -1] += 1.0
        assert not torch.allclose(tower.projector.glob(moved.flatten(1)), out[:, 0])
    old = {k: v for k, v in cfg.to_dict().items() if k != "global_token"}
    assert VisionConfig.from_dict(old).num_image_tokens == 4


def test_splice_puts_image_tokens_at_placeholders():
    emb = torch.zeros(2, 5, 3)
    is_img = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    feats = torch.arange(12).float().view(2, 2, 3)
    out = splice_image_tokens(emb, is_img, feats)
    assert out[0, 1].tolist() == [0, 1, 2] and out[1, 4].tolist() == [9, 10, 11] and out[0, 0].abs().sum() == 0
    with pytest.raises(ValueError):
        splice_image_tokens(emb, is_img, feats[:1])
    assert expand_image_markers([1, 9, 2], 9, 3) == [1, 9, 9, 9, 2]


# ---------------------------------------------------------------------- images
def test_load_image_modes(tmp_path):
    rgb = load_image(png_bytes("RGB"), 8, 3)
    assert rgb.shape == (3, 8, 8) and rgb.dtype == torch.uint8 and int(rgb[0, 4, 4]) == 200
    grey_as_rgb = load_image(png_bytes("L", color=(90, 0, 0)), 8, 3)
    assert grey_as_rgb.shape == (3, 8, 8) and int(grey_as_rgb[1, 0, 0]) == 90
    rgba = load_image(png_bytes("RGBA"), 8, 1)  # half-transparent red on white, as grey
    assert rgba.shape == (1, 8, 8) and 100 < int(rgba[0, 0, 0]) < 250
    p = tmp_path / "a.jpg"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(p, format="JPEG")
    assert load_image(p, 4, 3).shape == (3, 4, 4)
    x = normalize(rgb[None])
    assert x.dtype == torch.float32 and -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_bad_images(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png", 8)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(bad, 8)
    with pytest.raises(ImageTooLarge, match="pixels"):
        load_image(png_bytes(size=(300, 300)), 8, max_pixels=10_000)
    with pytest.raises(ImageTooLarge, match="bytes"):
        load_image(png_bytes(), 8, max_bytes=10)
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert load_image(decode_data_url(url), 4).shape == (3, 4, 4)
    for bad_url, msg in [("http://x/y.png", "data: URL"), ("data:image/png;base64,@@@", "base64"),
                         ("data:text/plain;base64,aGk=", "not an image")]:
        with pytest.raises(ImageError, match=msg):
            decode_data_url(bad_url)


def test_image_records(tmp_path):
    write_digits(tmp_path / "d", per_class=3)
    recs = read_image_records(str(tmp_path / "d" / "train"), "image_classification")
    assert len(recs) == 20 and {r["label"] for r in recs} == {str(i) for i in range(10)}
    (tmp_path / "d" / "train" / "empty").mkdir()
    with pytest.raises(ImageError, match="empty class folder"):
        read_image_records(str(tmp_path / "d" / "train"), "image_classification")
    counts = write_shapes_vqa(tmp_path / "s", 20, seed=1, size=16)
    assert counts["train"] > 40
    recs = read_image_records(str(tmp_path / "s" / "train.jsonl"), "vqa")
    assert all(r["image"].startswith(str(tmp_path)) for r in recs)  # relative to the jsonl's folder
    lines = (tmp_path / "s" / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    del rec["answer"]
    (tmp_path / "s" / "bad.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(ImageError, match="line 1: missing 'answer'"):
        read_image_records(str(tmp_path / "s" / "bad.jsonl"), "vqa")
    with pytest.raises(ImageError, match="no such file"):
        read_image_records(str(tmp_path / "nope.jsonl"), "vqa")


def test_shapes_generator_is_seeded(tmp_path):
    write_shapes_vqa(tmp_path / "a", 10, seed=3, size=16)
    write_shapes_vqa(tmp_path / "b", 10, seed=3, size=16)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    assert (tmp_path / "a" / "images" / "000003.png").read_bytes() == (tmp_path / "b" / "images" / "000003.png").read_bytes()


# ---------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tok_lm():
    tok = SeekTokenizer.train(texts=["what color is the circle? red green blue yes no"] * 20, vocab_size=300)
    lm = SeekForCausalLM(tiny_config(vocab_size=tok.vocab_size, num_hidden_layers=2))
    tid = add_image_token(tok)
    grow_vocab(lm, tok.vocab_size)
    return tok, lm, tid


def test_vision_lm_forward_generate_save_load(tok_lm, tmp_path):
    tok, lm, tid = tok_lm
    assert tok.encode(IMAGE_TOKEN) == [tid] and lm.config.vocab_size == tok.vocab_size
    vlm = SeekForVisionLM(lm, VisionConfig.from_preset("vit-nano", image_size=8), tid).eval()
    ids = expand_image_markers(tok.encode(tok.apply_chat_template([{"role": "user", "content": IMAGE_TOKEN + "hi"}])),
                               tid, vlm.num_image_tokens)
    pix = torch.randn(1, 3, 8, 8)
    a = vlm(torch.tensor([ids]), pixel_values=pix).logits
    b = vlm(torch.tensor([ids]), pixel_values=pix * 0).logits
    assert not torch.allclose(a, b)  # the image reaches the trunk
    out = vlm.generate([ids], pix, max_new_tokens=4, do_sample=False, return_dict=True)
    full = torch.tensor([ids])
    for t in out.new_tokens[0][:3]:  # cached greedy decoding == full forwards with the image spliced in
        assert int(vlm(full, pixel_values=pix).logits[0, -1].argmax()) == t
        full = torch.cat([full, torch.tensor([[t]])], 1)
    vlm.save_pretrained(tmp_path / "m", tokenizer=tok)
    again = SeekForVisionLM.from_pretrained(tmp_path / "m")
    assert torch.allclose(again(torch.tensor([ids]), pixel_values=pix).logits, a, atol=1e-5)
    assert SeekTokenizer.load(tmp_path / "m").encode(IMAGE_TOKEN) == [tid]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # the text part is a plain HF LM
    text = torch.tensor([tok.encode("what color", add_bos=True)])
    assert torch.allclose(hf(text).logits, again.lm(text).logits, atol=1e-4)


def test_vision_multitask_save_load(tok_lm, tmp_path):
    from seekformer.models.loading import load_multitask

    tok, lm, tid = tok_lm
    decls = [{"name": "img", "type": "image_classification", "labels": ["a", "b"], "dropout": 0.0},
             {"name": "vqa", "type": "vqa"}]
    m = SeekForVisionMultiTask(lm, decls, VisionConfig.from_preset("vit-nano", image_size=8), tid).eval()
    ids = torch.tensor([[1] + [tid] * m.vision.config.num_image_tokens + [2]])
    pix = torch.randn(1, 3, 8, 8)
    logits = m("img", ids, pixel_values=pix).logits
    m.save_pretrained(tmp_path / "mt", tokenizer=tok)
    loaded = load_multitask(tmp_path / "mt")
    assert isinstance(loaded, SeekForVisionMultiTask)
    from seekformer.errors import CheckpointError
    from seekformer.models.multitask import SeekForMultiTask

    with pytest.raises(CheckpointError, match="vision tower"):  # not silently without its tower
        SeekForMultiTask.from_pretrained(tmp_path / "mt")
    assert torch.allclose(loaded("img", ids, pixel_values=pix).logits, logits, atol=1e-5)


def test_recipe_checks(tmp_path):
    from seekformer.training.multitask_recipe import finetune_recipe_from_dict

    with pytest.raises(RecipeError, match="vision.stage"):
        finetune_recipe_from_dict({"base": "x", "tasks": [{"name": "a", "type": "vqa", "train": "t.jsonl"}],
                                   "vision": {"stage": 3}})
    with pytest.raises(RecipeError, match="vision.bogus"):
        finetune_recipe_from_dict({"base": "x", "tasks": [{"name": "a", "type": "vqa", "train": "t.jsonl"}],
                                   "vision": {"bogus": 1}})
    with pytest.raises(TaskError, match="no label set"):
        finetune_recipe_from_dict({"base": "x", "tasks": [{"name": "a", "type": "vqa", "train": "t.jsonl",
                                                           "labels": ["x", "y"]}]})


def test_stage1_trains_projector_only_and_caches_features(tok_lm):
    from seekformer.training.multitask_recipe import finetune_recipe_from_dict
    from seekformer.training.vision import configure_vision

    tok, lm, tid = tok_lm
    recipe = finetune_recipe_from_dict({"base": "x", "tasks": [{"name": "v", "type": "vqa", "train": "t.jsonl"}],
                                        "vision": {"stage": 1, "lr": 1e-3}})
    m = SeekForVisionMultiTask(SeekForCausalLM(lm.config), [{"name": "v", "type": "vqa"}],
                               VisionConfig.from_preset("vit-nano", image_size=8), tid)
    groups = configure_vision(m, recipe)
    trainable = {id(p) for g in groups for p in g["params"]}
    assert trainable == {id(p) for p in m.vision.projector.parameters()}
    assert not any(p.requires_grad for p in m.lm.parameters())
    ids = torch.tensor([[1] + [tid] * m.vision.config.num_image_tokens + [5, 6]])
    pix = torch.randn(2, 3, 8, 8)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # the answer: the last two tokens
    labels = labels.repeat(2, 1)
    out = m("v", ids.repeat(2, 1), pixel_values=pix, labels=labels)
    out.loss.backward()
    assert all(p.grad is not None for p in m.vision.projector.parameters())
    assert len(m._feature_cache) == 2  # frozen encoder: features cached per image
    again = m("v", ids.repeat(2, 1), pixel_values=pix, labels=labels)
    assert out.logits.shape == (2 * 2, lm.config.vocab_size)  # only the answer-predicting positions
    assert torch.allclose(again.loss, out.loss, atol=1e-5) and len(m._feature_cache) == 2


def test_lora_on_vision_multitask_saves_merged(tok_lm, tmp_path):
    pytest.importorskip("peft")
    from seekformer.models.loading import load_multitask

    tok, lm, tid = tok_lm
    m = SeekForVisionMultiTask(SeekForCausalLM(lm.config), [{"name": "v", "type": "vqa"}],
                               VisionConfig.from_preset("vit-nano", image_size=8), tid)
    assert m.add_lora(r=4, targets=["q_proj", "o_proj"]) > 0
    with torch.no_grad():
        for n, p in m.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[1] + [tid] * m.vision.config.num_image_tokens + [5, 6]])
    pix = torch.randn(1, 3, 8, 8)
    m.eval()
    before = m("v", ids, pixel_values=pix).logits
    m.save_pretrained(tmp_path / "lora", tokenizer=tok)
    loaded = load_multitask(tmp_path / "lora")
    assert not loaded.has_lora()
    assert torch.allclose(loaded("v", ids, pixel_values=pix).logits, before, atol=1e-4)


# ---------------------------------------------------------------------- session 4: stem, prompt order, cache
def test_strided_stem_shapes():
    cfg = VisionConfig.from_preset("vit-tiny", image_size=32, pixel_shuffle=True, lm_hidden_size=32,
                                   conv_stem=True, strided_stem=True)
    tower = VisionTower(cfg)
    convs = [m for m in tower.encoder.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    # one 3x3 stem conv at full resolution, then log2(4) = 2 stride-2 3x3 convs; the patchify conv is 1x1
    assert [c.stride for c in convs] == [(1, 1), (2, 2), (2, 2)]
    assert tower.encoder.patch_embed.proj.kernel_size == (1, 1)
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, cfg.num_image_tokens, 32) and cfg.num_image_tokens == 16
    with pytest.raises(Exception, match="power-of-two"):
        VisionConfig.from_preset("vit-nano", image_size=24, patch_size=6, strided_stem=True)


@pytest.mark.parametrize("text_first", [True, False])
def test_prompt_order_same_in_training_chat_and_server(tok_lm, text_first, monkeypatch):
    """VQA training/eval, `generate --image`, chat `/image` and the server build the same ids; a vision.json
    without `text_first` (written before it existed) keeps the image first."""
    import types

    from seekformer.data.tasks import Encoder, TaskRecipe
    from seekformer.inference import vision as iv
    from seekformer.models.vision_lm import VisionSetup
    from seekformer.serving.protocol import ChatMessage
    from seekformer.serving.vision import VisionChat

    tok, lm, tid = tok_lm
    d = VisionConfig.from_preset("vit-nano", image_size=8).to_dict()
    if not text_first:
        del d["text_first"]
    cfg = VisionConfig.from_dict(d)
    assert cfg.text_first is text_first
    vlm = SeekForVisionLM(lm, cfg, tid).eval()
    q, png = "what color is the circle?", png_bytes(size=(8, 8))
    content = q + IMAGE_TOKEN if text_first else IMAGE_TOKEN + q
    want = expand_image_markers(tok.encode(tok.apply_chat_template([{"role": "user", "content": content}])), tid,
                                vlm.num_image_tokens)
    seen = []
    monkeypatch.setattr(iv, "stream_ids", lambda vlm, tok, ids, pix, **kw: seen.append(ids) or iter(["x"]))
    list(iv.stream_with_images(vlm, tok, q, [png], max_new_tokens=1))
    chat = iv.VisionChatSession(vlm, tok, max_new_tokens=1)
    chat.add_image(png)
    list(chat.send(q))
    spec = TaskRecipe(name="s", type="vqa", train="x.jsonl")
    rec = {"image": png, "question": q, "answer": "red"}
    ex = Encoder(spec, tok, None, image=VisionSetup(cfg, tid)).encode([rec], "test", training=False)[0]
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    req = types.SimpleNamespace(messages=[ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]})])
    ids, images = VisionChat(types.SimpleNamespace(tok=tok), vlm)._inputs(req)
    assert seen[0] == seen[1] == ex["input_ids"][: ex["prompt_len"]] == want
    assert iv.expand_prompt(vlm, ids, len(images)) == want


def test_image_cache_returns_identical_pixels(tmp_path):
    from seekformer.data.tasks import Encoder, TaskRecipe
    from seekformer.models.vision_lm import VisionSetup

    counts = write_shapes_vqa(tmp_path, 6, seed=1, size=16)
    recs = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    for r in recs:
        r["image"] = str(tmp_path / r["image"])
    cfg = VisionConfig.from_preset("vit-nano", image_size=16)
    spec = TaskRecipe(name="s", type="vqa", train="x.jsonl")
    enc = Encoder(spec, SeekTokenizer.train(texts=["what color is the shape"] * 5, vocab_size=280), None,
                  image=VisionSetup(cfg, 0))
    examples = [enc._vqa(r, "t") for r in recs]
    assert len(examples) == counts["train"] and len(enc._image_cache) == len({r["image"] for r in recs})
    for r, ex in zip(recs, examples):  # cached pixels are those of a fresh decode
        assert torch.equal(ex["pixels"], load_image(r["image"], 16, 3))
