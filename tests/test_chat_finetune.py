"""Chat fine-tuning (task `type: chat`): rendering with the model's chat template, loss on assistant tokens
only, multi-turn, mixing with other tasks, clear errors, and a tiny model that learns to answer through
`/v1/chat/completions` after `seekformer finetune`."""

from __future__ import annotations

import json

import pytest
import torch

from seekformer.checkpoint import save_model
from seekformer.cli import main
from seekformer.data.tasks import IGNORE, Encoder, TaskRecipe, collate
from seekformer.errors import DataError
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.tokenizer import SeekTokenizer

from .conftest import tiny_config
from .test_finetune_cli import user_error

QA = [("What is the capital of France?", "Paris."), ("What is the capital of Japan?", "Tokyo."),
      ("What is the capital of Peru?", "Lima."), ("What is the capital of Kenya?", "Nairobi."),
      ("What is the capital of Chile?", "Santiago."), ("What is the capital of Cuba?", "Havana.")]
MULTI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of Peru?"},
                      {"role": "assistant", "content": "Lima."}]}


def conv(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    texts = [f"{q} {a}" for q, a in QA] * 30 + ["Be brief. Hi! Hello. the cat sat on the mat"] * 10
    tok = SeekTokenizer.train(texts=texts, vocab_size=400, min_frequency=2)
    lm = SeekForCausalLM(tiny_config(vocab_size=tok.vocab_size, num_hidden_layers=2, max_position_embeddings=128))
    lm.reset_parameters(seed=0)
    path = tmp_path_factory.mktemp("chat") / "base"
    save_model(lm, path, extra_files=tok.files())
    return str(path)


def test_loss_on_assistant_tokens_only_multi_turn(base):
    tok = SeekTokenizer.load(base)
    ex = Encoder(TaskRecipe(name="c", type="chat", max_length=128), tok, None).encode([MULTI], "mem")[0]
    assert ex["input_ids"] == tok.chat_ids(MULTI["messages"], add_generation_prompt=False)
    learned = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    eot = tok.end_of_turn_token_id
    assert learned == tok.encode("Hello.") + [eot] + tok.encode("Lima.") + [eot]
    assert all(lab in (IGNORE, t) for t, lab in zip(ex["input_ids"], ex["labels"]))
    # the evaluation prompt is the conversation up to the last assistant turn, as served
    assert ex["input_ids"][: ex["prompt_len"]] == tok.chat_ids(MULTI["messages"][:-1])
    assert (ex["source"], ex["target"]) == ("Capital of Peru?", "Lima.")
    batch = collate([ex], "chat", tok.pad_token_id)
    assert batch["labels"].shape == batch["input_ids"].shape


def test_no_assistant_turn_is_a_clear_error(base, tmp_path, capsys):
    tok = SeekTokenizer.load(base)
    enc = Encoder(TaskRecipe(name="c", type="chat"), tok, None)
    with pytest.raises(DataError, match="record 1: the conversation has no assistant turn"):
        enc.encode([{"messages": [{"role": "user", "content": "hi"}]}], "mem")
    with pytest.raises(DataError, match="role"):
        enc.encode([{"messages": [{"role": "robot", "content": "hi"}]}], "mem")
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(conv(*QA[0])) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]})
                    + "\n")
    r = tmp_path / "r.yaml"
    r.write_text(json.dumps({"base": base, "out": str(tmp_path / "o"),
                             "tasks": [{"name": "c", "type": "chat", "train": str(data)}],
                             "train": {"steps": 1, "progress": False}}))
    user_error(capsys, ["finetune", str(r)], "bad.jsonl record 2: the conversation has no assistant turn")


def test_chat_finetune_answers_through_the_server(base, tmp_path):
    """A tiny model fine-tuned (with a classification task mixed in) answers the trained questions."""
    openai = pytest.importorskip("openai")
    from seekformer.serving import ServerConfig, ServerThread, create_app, load_model_dir

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(conv(q, a)) + "\n" for q, a in QA) + json.dumps(MULTI) + "\n")
    cls = tmp_path / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": q, "label": a[:1]}) + "\n" for q, a in QA))
    r = tmp_path / "r.yaml"
    r.write_text(json.dumps({"base": base, "out": str(tmp_path / "out"),
                             "tasks": [{"name": "qa", "type": "chat", "train": str(data), "max_length": 64},
                                       {"name": "cls", "type": "classification", "train": str(cls)}],
                             "train": {"steps": 120, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5,
                                       "progress": False, "validate": False, "test": False}}))
    torch.manual_seed(0)
    main(["finetune", str(r)])
    model, tok = load_model_dir(tmp_path / "out")
    app = create_app(model, tok, ServerConfig(model_name="qa", max_batch_size=4))
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        right = 0
        for q, a in QA:
            out = client.chat.completions.create(model="qa", messages=[{"role": "user", "content": q}],
                                                 max_tokens=12, temperature=0)
            right += out.choices[0].message.content.strip() == a
            assert out.choices[0].finish_reason == "stop"  # stopped at <|end_of_turn|>
    assert right / len(QA) >= 0.8
