"""Multi-task model, task encoding, weighting strategies and metrics: fast unit tests on a tiny trunk."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from seekformer.checkpoint import save_model
from seekformer.data.builtin import read_task
from seekformer.data.tasks import Encoder, TaskRecipe, collate, infer_labels
from seekformer.errors import DataError, RecipeError, TaskError
from seekformer.evaluation.metrics import (classification_metrics, generation_metrics, qa_metrics,
                                           tagging_metrics)
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.models.multitask import BAG_BUCKETS, ClassificationHead, SeekForMultiTask, best_spans
from seekformer.tokenizer import SeekTokenizer
from seekformer.training.weighting import (DWAWeighting, GradNormWeighting, UncertaintyWeighting, build_weighting,
                                           pcgrad, sampling_probs)

from .conftest import tiny_config


def task_texts(n: int = 600) -> list[str]:
    """Real text of the three builtin task sets (and the derived QA questions) to train a small tokenizer."""
    out = [r["text"] for r in read_task("fortunes", "train")[:n]]
    out += [" ".join(r["tokens"]) for r in read_task("brown_pos", "train")[:n]]
    out += [r["source"] + "\n" + r["target"] for r in read_task("kjv_es", "train")[:n]]
    out += ["Who said this? What is the first noun? verb adjective adverb computers definitions men-women "
            "politics science work"] * 5
    return out


def make_tiny_base(path, layers: int = 2, seed: int = 0) -> str:
    """A randomly initialised tiny trunk (hidden 64) with a 1024-token BPE tokenizer, saved as a model dir."""
    tok = SeekTokenizer.train(texts=task_texts(), vocab_size=1024)
    lm = SeekForCausalLM(tiny_config(vocab_size=tok.vocab_size, num_hidden_layers=layers))
    lm.reset_parameters(seed=seed)
    save_model(lm, path, extra_files=tok.files())
    return str(path)



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("mt") / "base")


@pytest.fixture(scope="module")
def tok(base):
    return SeekTokenizer.load(base)


DECLS = [
    {"name": "cls", "type": "classification", "labels": ["a", "b", "c"], "pooling": "last", "dropout": 0.0},
    {"name": "tag", "type": "tagging", "labels": ["O", "B-X", "I-X"], "dropout": 0.0},
    {"name": "qa", "type": "qa", "dropout": 0.0},
    {"name": "gen", "type": "generation"},
]


def test_heads_shapes_and_generation_loss_on_target_only(base, tok):
    lm = SeekForCausalLM.from_pretrained(base)
    model = SeekForMultiTask(lm, DECLS).eval()
    ids = torch.randint(10, 1000, (2, 9))
    assert model("cls", ids).logits.shape == (2, 3)
    assert model("tag", ids).logits.shape == (2, 9, 3)
    assert model("qa", ids).logits.shape == (2, 9, 2)
    enc = Encoder(TaskRecipe(name="gen", type="generation"), tok, None)
    ex = enc.encode([{"source": "In the beginning", "target": "En el principio"}], "mem")[0]
    batch = collate([ex], "generation", tok.pad_token_id)
    out = model("gen", **batch)
    logits = lm(batch["input_ids"]).logits[0]
    p = ex["prompt_len"]
    want = torch.nn.functional.cross_entropy(logits[p - 1:-1], batch["input_ids"][0, p:])  # target tokens + eos
    assert torch.allclose(out.loss, want, atol=1e-5)
    assert ex["input_ids"][p:] == tok.encode("En el principio") + [tok.eos_token_id]


def test_classification_pools_last_non_pad_token(base, tok):
    model = SeekForMultiTask(SeekForCausalLM.from_pretrained(base), DECLS).eval()
    enc = Encoder(TaskRecipe(name="cls", type="classification", labels=["a", "b", "c"]), tok, ["a", "b", "c"])
    rows = [{"text": "a short one", "label": "a"}, {"text": "a much longer sentence here", "label": "b"}]
    exs = enc.encode(rows, "m")
    batch = collate(exs, "classification", tok.pad_token_id)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # right padding happened
    both = model("cls", batch["input_ids"], batch["attention_mask"]).logits
    alone = model("cls", torch.tensor([exs[0]["input_ids"]])).logits
    assert torch.allclose(both[0], alone[0], atol=1e-5)


def _states(lm, ids, mask) -> list[torch.Tensor]:
    """The embeddings and every decoder layer's output [B,T,D] (by hooks, independently of `layer_states`)."""
    states = [lm.model.embed_tokens(ids)]
    hooks = [layer.register_forward_hook(lambda m, a, o: states.append(o)) for layer in lm.model.layers]
    lm.model(ids, mask)
    for h in hooks:
        h.remove()
    return states


def test_layers_features_pool_every_depth(base, tok, tmp_path):
    """`features: layers`: the head reads the embeddings and each layer's output, each mean-pooled and
    RMS-normalised; the result matches pooling the states by hand, and survives save/load."""
    decl = {"name": "cls", "type": "classification", "labels": ["a", "b"], "pooling": "mean", "dropout": 0.0,
            "features": "layers"}
    lm = SeekForCausalLM.from_pretrained(base)
    model = SeekForMultiTask(lm, [decl]).eval()
    head = model.heads["cls"]
    n = lm.config.num_hidden_layers + 1
    assert head.proj.in_features == n * lm.config.hidden_size
    ids = torch.randint(10, 1000, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    states = _states(lm, ids, mask)
    x = states[0]
    m = mask.float().unsqueeze(-1)
    want = [(s * m).sum(1) / m.sum(1) for s in states]
    want = torch.cat([w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + 1e-6) / n ** 0.5 for w in want], -1)
    assert x.shape[-1] * n == want.shape[-1]
    assert torch.allclose(model("cls", ids, mask).logits, head.proj(want), atol=1e-5)
    model.save_pretrained(tmp_path / "ft", tokenizer=tok)
    again = SeekForMultiTask.from_pretrained(tmp_path / "ft").eval()
    assert torch.allclose(again("cls", ids, mask).logits, model("cls", ids, mask).logits, atol=1e-6)
    with pytest.raises(TaskError, match="features"):
        TaskRecipe(name="t", type="tagging", features="layers").validate()
    with pytest.raises(TaskError, match="features"):
        TaskRecipe(name="t", type="classification", features="deep").validate()


def test_bag_of_tokens_features(base, tok, tmp_path):
    """`features: layers+tokens`: one more block, which token ids the real tokens contain (RMS-normalised like
    the depths); the same logits batched with padding as alone; survives save/load; large vocabularies hashed."""
    decl = {"name": "cls", "type": "classification", "labels": ["a", "b"], "pooling": "mean", "dropout": 0.0,
            "features": "layers+tokens"}
    lm = SeekForCausalLM.from_pretrained(base)
    model = SeekForMultiTask(lm, [decl]).eval()
    head, cfg = model.heads["cls"], lm.config
    n = cfg.num_hidden_layers + 1
    assert head.bag == min(cfg.vocab_size, BAG_BUCKETS)
    assert head.proj.in_features == n * cfg.hidden_size + head.bag
    ids = torch.tensor([[5, 9, 9, 12, 0, 0], [7, 8, 9, 10, 11, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    bag = head.bag_of_tokens(ids, mask)
    assert bag[0].nonzero().flatten().tolist() == [5, 9, 12] and bag[1].sum() == 6  # padding (id 0) not counted
    states = torch.cat(_states(lm, ids, mask), -1)
    pooled = head.pool(states, mask, ids)
    k = (n + 1) ** 0.5
    want = bag / torch.sqrt(bag.pow(2).mean(-1, keepdim=True) + 1e-6) / k
    assert torch.allclose(pooled[:, n * cfg.hidden_size:], want, atol=1e-6)
    logits = model("cls", ids, mask).logits
    assert torch.allclose(logits, head.proj(pooled), atol=1e-5)
    assert torch.allclose(logits[0], model("cls", ids[:1, :4]).logits[0], atol=1e-5)  # padding changes nothing
    model.save_pretrained(tmp_path / "ft", tokenizer=tok)
    again = SeekForMultiTask.from_pretrained(tmp_path / "ft").eval()
    assert torch.allclose(again("cls", ids, mask).logits, logits, atol=1e-6)
    small = ClassificationHead(4, 2, "mean", 0.0, 1, bag=8)
    assert small.bag_of_tokens(torch.tensor([[3, 11, 19]]), torch.ones(1, 3)).nonzero()[:, 1].tolist() == [3]
    TaskRecipe(name="t", type="classification", features="final+tokens").validate()
    with pytest.raises(TaskError, match="features"):
        TaskRecipe(name="t", type="tagging", features="layers+tokens").validate()


def test_tagging_aligns_word_labels_to_sub_words(tok):
    labels = ["O", "B-NAME", "I-NAME"]
    words, tags = ["Mr.", "Kennedy", "spoke", "unexpectedly"], ["B-NAME", "I-NAME", "O", "O"]
    rec = {"tokens": words, "tags": tags}
    ex = Encoder(TaskRecipe(name="t", type="tagging"), tok, labels).encode([rec], "m")[0]
    assert len(ex["first"]) == 4 and ex["input_ids"][-1] == tok.eos_token_id
    assert [ex["labels"][i] for i in ex["first"]] == [1, 2, 0, 0]
    pieces = [tok.encode(w if i == 0 else " " + w) for i, w in enumerate(words)]
    assert ex["input_ids"][1:-1] == [t for p in pieces for t in p]
    assert sum(l != -100 for l in ex["labels"]) == 4  # continuation sub-words are ignored
    ex_all = Encoder(TaskRecipe(name="t", type="tagging", label_all_subwords=True), tok, labels).encode([rec], "m")[0]
    first_word = ex_all["labels"][1: 1 + len(pieces[0])]
    assert first_word == [1] + [2] * (len(pieces[0]) - 1)  # B-NAME, then I-NAME on its continuations


def test_qa_span_covers_the_answer(tok):
    ctx = "Money is the root of all evil. -- George Bernard Shaw, Man and Superman"
    rec = {"context": ctx, "question": "Who said this?", "answers": "George Bernard Shaw"}
    ex = Encoder(TaskRecipe(name="q", type="qa"), tok, None).encode([rec], "m")[0]
    assert tok.decode(ex["input_ids"][ex["start"]: ex["end"] + 1]).strip() == "George Bernard Shaw"
    batch = collate([ex], "qa", tok.pad_token_id)
    assert batch["span_mask"][0, ex["start"]] and not batch["span_mask"][0, ex["context_start"] - 1]
    assert not batch["span_mask"][0, -1]  # the appended EOS is not part of the context
    with pytest.raises(DataError, match="does not occur in its context"):
        Encoder(TaskRecipe(name="q", type="qa"), tok, None).encode([{**rec, "answers": "Oscar Wilde"}], "m")


def test_best_span_respects_order_mask_and_length():
    start = torch.tensor([[0.0, 5.0, 0.0, 0.0, 9.0]])
    end = torch.tensor([[0.0, 0.0, 1.0, 4.0, 0.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    assert best_spans(start, end, mask, max_len=5).tolist() == [[1, 3]]
    assert best_spans(start, end, mask, max_len=2).tolist() == [[1, 2]]


def test_save_load_roundtrip_and_transformers_loads_the_trunk(base, tok, tmp_path, caplog):
    model = SeekForMultiTask(SeekForCausalLM.from_pretrained(base), DECLS).eval()
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_()
    model.save_pretrained(tmp_path / "ft", tokenizer=tok)
    files = {p.name for p in (tmp_path / "ft").iterdir()}
    assert {"config.json", "model.safetensors", "heads.safetensors", "multitask.json", "tokenizer.json"} <= files
    again = SeekForMultiTask.from_pretrained(tmp_path / "ft")
    ids = torch.randint(10, 1000, (2, 7))
    for name in ("cls", "tag", "qa", "gen"):
        assert torch.allclose(model(name, ids).logits, again(name, ids).logits, atol=1e-6)
    assert json.loads((tmp_path / "ft" / "multitask.json").read_text())["tasks"][0]["labels"] == ["a", "b", "c"]
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_warning()
    with caplog.at_level(logging.WARNING):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not [r for r in caplog.records if "head" in r.getMessage().lower()]
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model.lm(ids).logits, atol=1e-4)


def test_lora_merges_into_a_plain_trunk(base, tok, tmp_path):
    pytest.importorskip("peft")
    model = SeekForMultiTask(SeekForCausalLM.from_pretrained(base), DECLS).eval()
    n = model.add_lora(r=4, alpha=8)
    assert n > 0 and not any(p.requires_grad for k, p in model.lm.named_parameters() if "lora_" not in k)
    with torch.no_grad():
        for k, p in model.lm.named_parameters():
            if "lora_B" in k:
                p.normal_(std=0.2)
    ids = torch.randint(10, 1000, (2, 7))
    with torch.no_grad():
        want = model("tag", ids).logits
        plain = SeekForCausalLM.from_pretrained(base)
        assert not torch.allclose(plain(ids).logits, model.lm(ids).logits, atol=1e-3)  # the adapters matter
        with model.merged_lora():
            assert torch.allclose(model("tag", ids).logits, want, atol=1e-4)
        assert torch.allclose(model("tag", ids).logits, want, atol=1e-5)  # unmerged again
    model.save_pretrained(tmp_path / "lora", tokenizer=tok)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    again = SeekForMultiTask.from_pretrained(tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(again("tag", ids).logits, want, atol=1e-4)


# ====================================================================== weighting
def test_pcgrad_removes_conflicts():
    g = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0, 1.0])}
    total, conflicts = pcgrad(g, seed=0)
    assert conflicts == 2
    pa = g["a"] - (g["a"] @ g["b"]) / (g["b"] @ g["b"]) * g["b"]
    pb = g["b"] - (g["b"] @ g["a"]) / (g["a"] @ g["a"]) * g["a"]
    assert torch.allclose(total, pa + pb)
    assert pa @ g["b"] >= -1e-6 and pb @ g["a"] >= -1e-6
    same = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0, 0.5])}
    assert torch.allclose(pcgrad(same)[0], same["a"] + same["b"]) and pcgrad(same)[1] == 0


def test_dwa_follows_the_loss_ratios():
    w = DWAWeighting(["a", "b"], temperature=2.0, window=2)
    for la, lb in [(2.0, 2.0), (2.0, 2.0), (1.0, 2.0), (1.0, 2.0)]:  # a halves its loss, b stalls
        w.update({"a": la, "b": lb})
    r = torch.tensor([0.5, 1.0])
    want = 2 * torch.softmax(r / 2.0, 0)
    got = w.weights()
    assert math.isclose(got["a"], float(want[0]), rel_tol=1e-5) and got["b"] > got["a"]


def test_gradnorm_lowers_the_weight_of_the_task_with_larger_gradients():
    w = GradNormWeighting(["a", "b"], alpha=1.5, lr=0.05)
    for _ in range(20):
        w.update({"a": 1.0, "b": 1.0}, {"a": 10.0, "b": 1.0})
    got = w.weights()
    assert got["a"] < 1.0 < got["b"] and math.isclose(got["a"] + got["b"], 2.0, rel_tol=1e-5)


def test_uncertainty_weights_tend_to_inverse_loss():
    w = UncertaintyWeighting(["a", "b"], lr=0.1)
    for _ in range(300):
        w.update({"a": 4.0, "b": 0.5})
    got = w.weights()
    assert math.isclose(got["a"], 1 / 4.0, rel_tol=0.05) and math.isclose(got["b"], 1 / 0.5, rel_tol=0.05)


def test_sampling_probabilities_and_unknown_strategy():
    p = sampling_probs({"a": 900, "b": 100}, "proportional")
    assert math.isclose(p["a"], 0.9)
    t = sampling_probs({"a": 900, "b": 100}, "temperature", 2.0)
    assert math.isclose(t["a"], 30 / 40)
    assert sampling_probs({"a": 900, "b": 100}, "uniform")["b"] == 0.5
    with pytest.raises(RecipeError, match="unknown weighting.strategy 'magic'"):
        build_weighting("magic", ["a"])


# ====================================================================== metrics and labels
def test_metrics_on_known_values():
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert m["accuracy"] == 0.75 and math.isclose(m["macro_f1"], (2 / 3 + 2 / 3 + 1) / 3)
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    t = tagging_metrics([["B-PER", "I-PER", "O", "O"]], gold, bio=True)
    assert t["token_accuracy"] == 0.75 and math.isclose(t["entity_f1"], 2 / 3)  # P=1, R=1/2
    pos = tagging_metrics([["NOUN", "VERB"]], [["NOUN", "NOUN"]], bio=False)
    assert pos["token_accuracy"] == 0.5 and math.isclose(pos["entity_f1"], 0.5)
    g = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert g["bleu"] > 99.9 and g["chrf"] > 99.9 and g["exact_match"] == 1.0
    q = qa_metrics(["the George Shaw", "x"], [["George Bernard Shaw"], ["y", "x."]])
    assert q["exact_match"] == 0.5 and math.isclose(q["f1"], (0.8 + 1.0) / 2)


def test_label_inference_errors():
    task = TaskRecipe(name="t", type="classification")
    assert infer_labels(task, [{"text": "x", "label": "b"}, {"text": "y", "label": "a"}], "m") == ["a", "b"]
    with pytest.raises(TaskError, match="cannot infer a label set"):
        infer_labels(task, [{"text": "x", "label": "a"}], "m")
    with pytest.raises(TaskError, match="not a single value"):
        infer_labels(task, [{"text": "x", "label": ["a", "b"]}], "m")
    tags = infer_labels(TaskRecipe(name="t", type="tagging"), [{"tokens": ["a", "b"], "tags": ["B-X", "O"]}], "m")
    assert tags[0] == "O"


def test_readers_csv_json_and_hf_disk(tmp_path):
    from seekformer.data.tasks import read_records

    (tmp_path / "t.csv").write_text("sentence,category\nhello there,a\n\"x, y\",b\n")
    task = TaskRecipe(name="t", type="classification", fields={"text": "sentence", "label": "category"})
    recs = read_records(str(tmp_path / "t.csv"))
    assert infer_labels(task, recs, "t.csv") == ["a", "b"] and recs[1]["sentence"] == "x, y"
    (tmp_path / "t.tsv").write_text("tokens\ttags\nThe dog\tDET NOUN\n")
    tag = TaskRecipe(name="g", type="tagging")
    assert infer_labels(tag, read_records(str(tmp_path / "t.tsv")), "t.tsv") == ["DET", "NOUN"]
    (tmp_path / "t.json").write_text(json.dumps({"data": [{"text": "a", "label": 1}]}))
    assert read_records(str(tmp_path / "t.json")) == [{"text": "a", "label": 1}]
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        read_records(str(tmp_path / "bad.jsonl"))
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
                               "tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-X"]))})
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"text": ["bad", "good"], "label": [0, 1], "tags": [[0], [1]]}, features=feats)})
    ds.save_to_disk(str(tmp_path / "hfds"))
    rows = read_records(f"hf:{tmp_path / 'hfds'}:train")
    assert rows[1]["label"] == "pos" and rows[1]["tags"] == ["B-X"]  # ClassLabel ids become names
