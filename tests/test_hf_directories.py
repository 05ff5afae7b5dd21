"""Any DeepSeek directory end to end: a DeepSeek-V3-like directory saved by transformers (DeepSeek's token
names, tokenizer_config.json and chat template, a tiny random model) generates, chats and serves in
seekformer; every saved model lists its end-of-turn tokens in generation_config.json and has a model card."""

from __future__ import annotations

import json

import pytest
import torch

from seekformer.checkpoint import save_model
from seekformer.inference import generate_text
from seekformer.inference.chat import ChatSession, load_model_and_tokenizer
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.tokenizer import SeekTokenizer
from tests.conftest import tiny_config
from tests.deepseek_like import EOS, write_model_dir

TEXTS = ["The cat sat on the mat. 12345 Hello world, how are you? " * 5,
         "Question: what is two plus two? Answer: four. Héllo wörld 🤖"] * 20


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("ds") / "model", TEXTS)


def test_generate_and_chat_stop_at_deepseek_end_of_sentence(deepseek_dir):
    model, tok = load_model_and_tokenizer(deepseek_dir)
    assert tok.eos_token == EOS and tok.end_of_turn_token_ids == (tok.eos_token_id,)
    text = generate_text(model, tok, tok.encode("Hello world", add_bos=True), max_new_tokens=6)
    assert isinstance(text, str)
    # the logits at the end of the prompt: force eos to be the most likely token and the reply ends there
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight.abs().max() * 50
    session = ChatSession(model, tok, system="Be terse.", max_new_tokens=8)
    info_reply = "".join(session.send("Hello 123"))
    assert info_reply == ""
    assert session.messages[-1] == {"role": "assistant", "content": ""}


def test_serve_deepseek_directory(deepseek_dir):
    openai = pytest.importorskip("openai")
    from seekformer.serving import ServerConfig, ServerThread, create_app, load_model_dir

    model, tok = load_model_dir(deepseek_dir)
    app = create_app(model, tok, ServerConfig(model_name="ds", max_batch_size=2))
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello 123 world"}]
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="ds", messages=messages, max_tokens=5, temperature=0)
        assert r.usage.prompt_tokens == len(tok.chat_ids(messages))
        assert r.choices[0].finish_reason in ("stop", "length")
        import httpx

        info = httpx.get(srv.url + "/tokenizer_info").json()
        assert info["eos_token"] == EOS and info["chat_template"] == tok.chat_template


def test_generation_config_lists_end_of_turn_and_model_card(tmp_path):
    tok = SeekTokenizer.train(texts=TEXTS, vocab_size=300, min_frequency=1)
    model = SeekForCausalLM(tiny_config(vocab_size=320))
    out = tmp_path / "m"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 5, "val_loss": 2.5, "val_ppl": 12.2}) + "\n")
    recipe = "base: /models/base-model\ntasks:\n- name: qa\n  type: chat\n  train: data/qa.jsonl\n"
    results = {"steps": 5, "validation": {"qa": {"chrf": 71.5, "exact_match": 0.5, "examples": 8}}}
    save_model(model, out, extra_files={**tok.files(), "recipe.yaml": recipe, "results.json": json.dumps(results)})
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, tok.end_of_turn_token_id]
    transformers = pytest.importorskip("transformers")
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [2, tok.end_of_turn_token_id]
    card = (out / "README.md").read_text()
    import yaml

    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "/models/base-model" and meta["datasets"] == ["qa.jsonl"]
    assert meta["metrics"] == ["chrf", "exact_match", "loss", "ppl"] and meta["license"] == "other"
    assert "| val_loss | 2.5 |" in card and "| validation/qa/chrf | 71.5 |" in card
    # a plain save (no tokenizer, no recipe) still writes a card and a single eos
    save_model(model, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "generation_config.json").read_text())["eos_token_id"] == 2
    assert yaml.safe_load((tmp_path / "plain" / "README.md").read_text().split("---")[1])["library_name"] == \
        "transformers"


def test_hub_id_from_the_local_cache_and_a_clear_offline_error(deepseek_dir, tmp_path, monkeypatch):
    """`from_pretrained("owner/name")` goes through huggingface_hub.snapshot_download: a cached snapshot loads
    offline; an id that is neither local nor cached is one clear CheckpointError."""
    import shutil

    hub = pytest.importorskip("huggingface_hub")
    from seekformer.errors import CheckpointError

    cache = tmp_path / "hub"
    commit = "0" * 40
    snap = cache / "models--deepseek-like--tiny-v3" / "snapshots" / commit
    shutil.copytree(deepseek_dir, snap)
    (cache / "models--deepseek-like--tiny-v3" / "refs").mkdir()
    (cache / "models--deepseek-like--tiny-v3" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    model, tok = load_model_and_tokenizer("deepseek-like/tiny-v3")
    assert tok.eos_token == EOS and model.config.vocab_size == 640
    assert SeekForCausalLM.from_pretrained("deepseek-like/tiny-v3").config.hidden_size == 64
    with pytest.raises(CheckpointError, match="cannot be fetched from the Hugging Face hub: it is not in the local "
                                              "cache"):
        load_model_and_tokenizer("nobody/missing-model")


def test_chat_without_a_template_is_one_clear_line(deepseek_dir, tmp_path, capsys):
    import shutil

    from .test_finetune_cli import user_error

    d = tmp_path / "no-template"
    shutil.copytree(deepseek_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    user_error(capsys, ["chat", str(d)], 'no chat template: add a "chat_template" (Jinja) to tokenizer_config.json')
