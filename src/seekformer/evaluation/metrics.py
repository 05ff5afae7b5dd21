"""Task metrics, and `evaluate_task`: predict a fine-tuned task on records and score it.

* classification  accuracy, macro_f1 (mean over the declared labels of per-label F1)
* tagging         token_accuracy (word level), entity_f1 / entity_precision / entity_recall (seqeval,
                  entity level) and macro_f1 over tags. For a tag set without a BIO-style scheme (e.g. POS
                  tags) each word is its own entity ("B-<tag>"), so entity_f1 is the micro F1 over words.
* generation      bleu, chrf (sacrebleu, corpus level), exact_match
* qa              exact_match, f1 (SQuAD: lower case, no punctuation/articles, token overlap; max over the
                  gold answers)
"""

from __future__ import annotations

import collections
import contextlib
import re
import string
from typing import Any

import torch

SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ====================================================================== metric functions
def classification_metrics(preds: list[int], golds: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over `num_labels` classes (a class absent from both counts as F1 0)."""
    n = max(1, len(golds))
    acc = sum(p == g for p, g in zip(preds, golds)) / n
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / max(1, len(f1s))}


def _as_entities(seq: list[str], bio: bool) -> list[str]:
    return seq if bio else ["B-" + t for t in seq]


def tagging_metrics(pred_seqs: list[list[str]], gold_seqs: list[list[str]], bio: bool) -> dict[str, float]:
    """Word-level accuracy, seqeval entity P/R/F1, and macro F1 over the tags seen in gold or predictions."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    words = sum(len(g) for g in gold_seqs)
    correct = sum(p == g for ps, gs in zip(pred_seqs, gold_seqs) for p, g in zip(ps, gs))
    p_ent = [_as_entities(s, bio) for s in pred_seqs]
    g_ent = [_as_entities(s, bio) for s in gold_seqs]
    flat_p = [t for s in pred_seqs for t in s]
    flat_g = [t for s in gold_seqs for t in s]
    tags = sorted(set(flat_g))
    ids = {t: i for i, t in enumerate(tags)}
    macro = classification_metrics([ids.get(t, -1) for t in flat_p], [ids[t] for t in flat_g], len(tags))["macro_f1"]
    return {"token_accuracy": correct / max(1, words),
            "entity_f1": float(f1_score(g_ent, p_ent, zero_division=0)),
            "entity_precision": float(precision_score(g_ent, p_ent, zero_division=0)),
            "entity_recall": float(recall_score(g_ent, p_ent, zero_division=0)),
            "macro_f1": macro}


def generation_metrics(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenizer, chrF n=6, beta=2) and exact match."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
            "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score),
            "exact_match": sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / max(1, len(refs))}


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(SQUAD_ARTICLES.sub(" ", s).split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def qa_metrics(preds: list[str], golds: list[list[str]]) -> dict[str, float]:
    """SQuAD exact match and token F1 (each the max over an example's gold answers), as fractions."""
    n = max(1, len(golds))
    em = sum(max(normalize_answer(p) == normalize_answer(g) for g in gs) for p, gs in zip(preds, golds)) / n
    f1 = sum(max(_f1(p, g) for g in gs) for p, gs in zip(preds, golds)) / n
    return {"exact_match": em, "f1": f1}


PRIMARY_METRIC = {"classification": "accuracy", "tagging": "token_accuracy", "qa": "f1", "generation": "chrf",
                  "chat": "chrf", "image_classification": "accuracy", "vqa": "exact_match"}


# ====================================================================== predictions
@torch.no_grad()
def predict_task(model, tokenizer, task: dict[str, Any], examples: list[dict], batch_size: int = 32) -> list[Any]:
    """Predictions of `model` (SeekForMultiTask) for encoded `examples` of `task` (a task declaration).

    classification -> label strings; tagging -> word-level tag lists (words cut by max_length get the first
    label); qa -> answer strings (context characters of the best span); generation -> decoded greedy text.
    """
    from ..data.tasks import eval_batches
    from ..models.multitask import best_spans

    was_training = model.training
    model.eval()
    name, kind, labels = task["name"], task["type"], task.get("labels") or []
    pad = tokenizer.pad_token_id
    out: list[Any] = []
    try:
        if kind in ("generation", "chat"):
            return _generate(model, tokenizer, task, examples, batch_size)
        if kind in ("image_classification", "vqa"):
            return predict_image_task(model, tokenizer, task, examples, batch_size)
        for chunk, batch in eval_batches(examples, kind, batch_size, pad):
            batch = {k: v.to(model.device) for k, v in batch.items()}
            res = model(name, batch["input_ids"], batch["attention_mask"])
            if kind == "classification":
                out += [labels[i] for i in res.logits.argmax(-1).tolist()]
            elif kind == "tagging":
                pred = res.logits.argmax(-1).tolist()
                for e, row in zip(chunk, pred):
                    words = [labels[row[i]] for i in e["first"]]
                    out.append(words + [labels[0]] * (len(e["tags"]) - len(words)))
            else:
                spans = best_spans(res.logits[..., 0].float(), res.logits[..., 1].float(), batch["span_mask"],
                                   int(task.get("max_answer_tokens", 30))).tolist()
                for e, (s, t) in zip(chunk, spans):
                    offs = e["offsets"]
                    i, j = s - e["context_start"], t - e["context_start"]
                    out.append(e["context"][offs[i][0]: offs[j][1]].strip() if 0 <= i <= j < len(offs) else "")
        return out
    finally:
        model.train(was_training)


def _generate(model, tokenizer, task: dict[str, Any], examples: list[dict], batch_size: int) -> list[str]:
    """Greedy decoding of the prompts (LoRA merged for the duration: cached attention reads raw weights)."""
    from ..inference.generate import generate

    texts: list[str] = []
    ctx = model.merged_lora() if model.has_lora() else contextlib.nullcontext()
    limit = model.config.max_position_embeddings
    with ctx:
        order = sorted(range(len(examples)), key=lambda i: examples[i]["prompt_len"])  # less padding
        results: dict[int, str] = {}
        for k in range(0, len(order), batch_size):
            idx = order[k: k + batch_size]
            prompts = [examples[i]["input_ids"][: examples[i]["prompt_len"]] for i in idx]
            new = max(1, min(int(task.get("max_new_tokens", 64)), limit - max(len(p) for p in prompts)))
            stops = tuple(getattr(tokenizer, "stop_token_ids", None) or (tokenizer.eos_token_id,))
            res = generate(model.lm, prompts, max_new_tokens=new, do_sample=False, eos_token_id=stops,
                           return_dict=True)
            for i, toks in zip(idx, res.new_tokens):
                results[i] = tokenizer.decode([t for t in toks if t not in stops]).strip()
        texts = [results[i] for i in range(len(examples))]
    return texts


@torch.no_grad()
def predict_image_task(model, tokenizer, task: dict[str, Any], examples: list[dict], batch_size: int) -> list[Any]:
    """image_classification -> label strings; vqa -> greedy answers of the LM head (up to end of turn)."""
    from ..data.tasks import eval_batches

    name, kind, labels = task["name"], task["type"], task.get("labels") or []
    out: list[Any] = []
    if kind == "image_classification":
        for _, batch in eval_batches(examples, kind, batch_size, tokenizer.pad_token_id):
            batch = {k: v.to(model.device) for k, v in batch.items()}
            res = model(name, batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
            out += [labels[i] for i in res.logits.argmax(-1).tolist()]
        return out
    vlm = model.vision_lm()
    stops = [i for i in (tokenizer.end_of_turn_token_id, tokenizer.eos_token_id) if i is not None]
    limit = model.config.max_position_embeddings
    ctx = model.merged_lora() if model.has_lora() else contextlib.nullcontext()
    with ctx:
        for k in range(0, len(examples), batch_size):
            chunk = examples[k: k + batch_size]
            prompts = [e["input_ids"][: e["prompt_len"]] for e in chunk]
            from ..data.images import normalize

            pix = normalize(torch.stack([e["pixels"] for e in chunk])).to(model.device)
            new = max(1, min(int(task.get("max_new_tokens", 64)), limit - max(len(p) for p in prompts)))
            res = vlm.generate(prompts, pix, max_new_tokens=new, do_sample=False, eos_token_id=stops,
                               return_dict=True)
            out += [tokenizer.decode([t for t in toks if t not in stops]).strip() for toks in res.new_tokens]
    return out


def score_task(task: dict[str, Any], examples: list[dict], preds: list[Any]) -> dict[str, float]:
    """Metrics of `preds` against the gold answers stored in the encoded `examples`."""
    kind, labels = task["type"], task.get("labels") or []
    if kind == "vqa":
        return {"exact_match": sum(normalize_answer(p) == normalize_answer(e["answers"][0])
                                   for p, e in zip(preds, examples)) / max(1, len(examples))}
    if kind in ("classification", "image_classification"):
        return classification_metrics([labels.index(p) for p in preds], [e["label"] for e in examples], len(labels))
    if kind == "tagging":
        from ..data.tasks import is_bio

        return tagging_metrics(preds, [e["tags"] for e in examples], is_bio(labels))
    if kind == "qa":
        return qa_metrics(preds, [e["answers"] for e in examples])
    return generation_metrics(preds, [e["target"] for e in examples])


def evaluate_task(model, tokenizer, task: dict[str, Any], examples: list[dict],
                  batch_size: int = 32) -> dict[str, float]:
    """Predict and score: {metric: value} (plus "examples": n)."""
    preds = predict_task(model, tokenizer, task, examples, batch_size)
    return {**score_task(task, examples, preds), "examples": len(examples)}


def baseline_metrics(task: dict[str, Any], train_examples: list[dict], examples: list[dict]) -> dict[str, float]:
    """Trivial baselines: majority class / most frequent tag per task; copy-the-source (generation) and the
    first words of the context, as long as the mean training answer (qa)."""
    kind, labels = task["type"], task.get("labels") or []
    if kind == "classification":
        top = collections.Counter(e["label"] for e in train_examples).most_common(1)[0][0]
        return score_task(task, examples, [labels[top]] * len(examples))
    if kind == "tagging":
        top = collections.Counter(t for e in train_examples for t in e["tags"]).most_common(1)[0][0]
        return score_task(task, examples, [[top] * len(e["tags"]) for e in examples])
    if kind == "qa":
        n = max(1, round(sum(len(e["answers"][0].split()) for e in train_examples) / len(train_examples)))
        return score_task(task, examples, [" ".join(e["context"].split()[:n]) for e in examples])
    return score_task(task, examples, [e.get("source", "") for e in examples])


__all__ = ["classification_metrics", "tagging_metrics", "generation_metrics", "qa_metrics", "normalize_answer",
           "predict_task", "score_task", "evaluate_task", "baseline_metrics", "PRIMARY_METRIC"]
