"""Fine-tuning task data: declarations (`TaskRecipe`), validation, encoding and batches (readers: task_sources.py).

A task is declared in a fine-tuning recipe:

    - name: topic
      type: classification        # classification | tagging | qa | generation | chat
      train: train.jsonl          # .jsonl[.gz], .json, .csv/.tsv, builtin:NAME[:SPLIT], hf:NAME[:CONFIG]:SPLIT
      validation: val.jsonl       # optional (a builtin task brings its own validation and test splits)
      fields: {text: sentence}    # optional renames of the type's fields (defaults in FIELDS)
      labels: [a, b, c]           # optional; inferred from the training split when absent

Records are dicts. Default field names per type: classification {text, label}; tagging {tokens, tags};
qa {context, question, answers}; generation {source, target}; chat {messages}. QA answers may be a
string, a list of strings or SQuAD's {"text": [...], "answer_start": [...]}.

A chat record is {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]} (the
OpenAI / Hugging Face convention). It is rendered with the model's own chat template (tokenizer_config.json)
and the loss covers the assistant turns only (their content and the end-of-turn token), every turn of a
multi-turn conversation; evaluation decodes the last assistant turn from the conversation before it.

`Encoder.encode` turns records into token ids with labels aligned to the tokens, and
`TaskBatches` yields right-padded tensors. Everything raises DataError / TaskError with the source,
record number and what to fix.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from ..errors import DataError, SeekformerError, TaskError
from .task_sources import BUILTIN_PREFIX, SPLITS, builtin_defaults, builtin_source, read_records  # noqa: F401

TASK_TYPES = ("classification", "tagging", "qa", "generation", "chat", "image_classification", "vqa")
FEATURES = ("final", "layers", "final+tokens", "layers+tokens")  # classification: what the head reads
LM_TASK_TYPES = ("generation", "chat")  # trained and decoded through the language-model head
IMAGE_TASK_TYPES = ("image_classification", "vqa")  # data/images.py, models/vision_lm.py
FIELDS: dict[str, tuple[str, ...]] = {
    "classification": ("text", "label"),
    "tagging": ("tokens", "tags"),
    "qa": ("context", "question", "answers"),
    "generation": ("source", "target"),
    "chat": ("messages",),
    "image_classification": ("image", "label"),
    "vqa": ("image", "question", "answer"),
}
CHAT_ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100
BIO_PREFIXES = ("B-", "I-", "E-", "S-", "L-", "U-")


@dataclass
class TaskRecipe:
    """One task of a fine-tuning recipe (see the module docstring).

    Keys:
        name: the task's name (letters, digits, '_' or '-'); names its head and its metrics
        type: classification | tagging | qa | generation
        train: training data: a .jsonl/.csv/.tsv file, `builtin:NAME` or `hf:NAME[:CONFIG[:SPLIT]]`
        validation: validation data (same forms; a builtin set brings its own)
        test: test data (same forms)
        fields: record field names when they differ from the type's defaults, e.g. {text: sentence}
        labels: the label set (classification, tagging); null: taken from the training data
        max_length: tokens per example (prompt + target for generation)
        pooling: classification: last (last non-pad token) | mean
        features: classification: final (the final-normed states) | layers (the embeddings and every layer's
            output, each pooled and RMS-normalised, side by side: lexical features a small trunk loses in depth);
            `+tokens` (final+tokens, layers+tokens) adds the text's bag of tokens (which token ids occur) as one
            more block
        dropout: head dropout (classification, tagging, qa)
        label_all_subwords: tagging: label continuation sub-words too (B-X -> I-X) instead of ignoring them
        max_answer_tokens: qa: longest predicted span
        max_new_tokens: generation: decoding budget
        prompt: generation: how the source is shown (before the separator token)
        weight: loss weight of the `fixed` strategy (initial weight for the others)
        max_train_examples: use at most this many training examples (null: all)
        max_eval_examples: use at most this many validation/test examples (null: all)
        augment: image tasks: random translation by up to N pixels in training (0: none)
    """

    name: str = ""
    type: str = ""
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    labels: list[str] | None = None
    max_length: int = 128  # tokens per example (prompt + target for generation)
    pooling: str = "last"  # classification: last (last non-pad token) | mean
    features: str = "final"  # classification: final | layers | final+tokens | layers+tokens
    dropout: float = 0.1  # head dropout (classification, tagging, qa)
    label_all_subwords: bool = False  # tagging: label continuation sub-words too (B-X -> I-X) instead of -100
    max_answer_tokens: int = 30  # qa: longest predicted span
    max_new_tokens: int = 64  # generation: decoding budget
    prompt: str = "{source}"  # generation: how the source is shown (before the separator token)
    weight: float = 1.0  # loss weight of the `fixed` strategy (initial weight for the others)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    augment: int = 0  # image tasks: random translation by up to N pixels in training


    def field_name(self, role: str) -> str:
        return self.fields.get(role, role)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_\-]+", self.name):
            raise TaskError(f"task name {self.name!r} must be non-empty letters, digits, '_' or '-'")
        if self.type not in TASK_TYPES:
            raise TaskError(f"task {self.name!r}: unknown type {self.type!r}; choose one of {', '.join(TASK_TYPES)}")
        bad = sorted(set(self.fields) - set(FIELDS[self.type]))
        if bad:
            raise TaskError(f"task {self.name!r}: fields {bad} are not fields of a {self.type} task "
                            f"(valid: {', '.join(FIELDS[self.type])})")
        if self.pooling not in ("last", "mean"):
            raise TaskError(f"task {self.name!r}: pooling must be 'last' or 'mean', got {self.pooling!r}")
        if self.features not in FEATURES:
            raise TaskError(f"task {self.name!r}: features must be one of {', '.join(FEATURES)}, "
                            f"got {self.features!r}")
        if self.features != "final" and self.type != "classification":
            raise TaskError(f"task {self.name!r}: features: {self.features} applies to classification tasks only")
        if self.max_length < 8:
            raise TaskError(f"task {self.name!r}: max_length must be >= 8, got {self.max_length}")
        if self.labels is not None and self.type in ("qa", "generation", "chat", "vqa"):
            raise TaskError(f"task {self.name!r}: a {self.type} task has no label set; remove 'labels'")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise TaskError(f"task {self.name!r}: the declared labels contain duplicates")


# ====================================================================== splits
def resolve_splits(task: TaskRecipe) -> dict[str, str]:
    """{split: source} of a task; `train: builtin:NAME` fills validation/test with that task's splits."""
    out = {s: getattr(task, s) for s in SPLITS if getattr(task, s)}
    if task.train and task.train.startswith(BUILTIN_PREFIX):
        name, split = builtin_source(task.train)
        if split is None:
            out["train"] = f"{BUILTIN_PREFIX}{name}:train"
            for s in ("validation", "test"):
                out.setdefault(s, f"{BUILTIN_PREFIX}{name}:{s}")
    return out


# ====================================================================== validation
def _get(task: TaskRecipe, rec: Any, role: str, where: str) -> Any:
    key = task.field_name(role)
    if not isinstance(rec, dict) or key not in rec or rec[key] is None:
        have = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
        raise DataError(f"{where}: no field {key!r} (fields: {have}); map it with `fields: {{{role}: NAME}}` "
                        f"in task {task.name!r}")
    return rec[key]


def _as_list(value: Any, where: str, what: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip().startswith("[") else value.split()
        except json.JSONDecodeError:
            raise DataError(f"{where}: {what} {value!r:.60} is neither a JSON list nor space-separated") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {what} must be a list (or a space-separated string), got {value!r:.60}")
    return [str(v) for v in value]


def answers_of(value: Any, where: str) -> tuple[list[str], list[int | None]]:
    """QA answers -> (texts, starts); starts are None when the data does not give them."""
    if isinstance(value, dict):
        texts = value.get("text", [])
        texts = [texts] if isinstance(texts, str) else list(texts)
        starts = value.get("answer_start", [None] * len(texts))
        starts = [starts] if isinstance(starts, int) else list(starts)
    elif isinstance(value, str):
        texts, starts = [value], [None]
    elif isinstance(value, list):
        texts, starts = [str(v) for v in value], [None] * len(value)
    else:
        raise DataError(f"{where}: answers must be a string, a list or {{'text': [...], 'answer_start': [...]}}")
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise DataError(f"{where}: no answer text; every QA record needs a non-empty answer")
    return texts, (starts + [None] * len(texts))[: len(texts)]


def find_answer(context: str, text: str, start: int | None, where: str) -> int:
    """Character start of `text` in `context` (checks a given start; else the first occurrence)."""
    if start is not None and context[start: start + len(text)] == text:
        return int(start)
    pos = context.find(text)
    if pos < 0:
        raise DataError(f"{where}: the answer {text!r:.60} does not occur in its context; extractive QA "
                        "needs answers copied from the context")
    return pos


def is_bio(labels: list[str]) -> bool:
    """True when every tag is O or carries a B-/I-/E-/S-/L-/U- prefix (an entity scheme seqeval reads)."""
    return all(t == "O" or t.startswith(BIO_PREFIXES) for t in labels) and any(t != "O" for t in labels)


def infer_labels(task: TaskRecipe, records: list[dict], source: str) -> list[str]:
    """The declared labels, or the sorted distinct labels of the training records."""
    if task.labels is not None:
        return list(task.labels)
    seen: set[str] = set()
    for i, rec in enumerate(records, start=1):
        where = f"{source} record {i}"
        if task.type in ("classification", "image_classification"):
            v = _get(task, rec, "label", where)
            if isinstance(v, (list, dict)):
                raise TaskError(f"{where}: label {v!r:.40} is not a single value; cannot infer the label set "
                                f"of task {task.name!r} (declare `labels:`)")
            seen.add(str(v))
        else:
            seen.update(_as_list(_get(task, rec, "tags", where), where, "tags"))
    if len(seen) < 2:
        raise TaskError(f"task {task.name!r}: the training data has {len(seen)} distinct label(s) "
                        f"({', '.join(sorted(seen)) or 'none'}); cannot infer a label set — declare `labels:` "
                        "with at least two labels")
    labels = sorted(seen)
    if task.type == "tagging" and "O" in labels:
        labels.remove("O")
        labels.insert(0, "O")
    return labels


# ====================================================================== encoding
class Encoder:
    """Turns records of one task into token ids and aligned labels. `labels` is the task's label list."""

    def __init__(self, task: TaskRecipe, tokenizer, labels: list[str] | None, image=None) -> None:
        """`image` (image tasks): an object with `config` (VisionConfig) and `image_token_id`."""
        self.task, self.tok, self.labels, self.image = task, tokenizer, labels, image
        self.label_id = {l: i for i, l in enumerate(labels or [])}
        self.sep = tokenizer.special_token_ids.get("<|assistant|>", tokenizer.eos_token_id)

    def _label(self, value: Any, where: str) -> int:
        if str(value) not in self.label_id:
            raise TaskError(f"{where}: label {value!r} is not in the label set of task {self.task.name!r} "
                            f"({', '.join(self.labels[:12])}); fix the data or add it to `labels:`")
        return self.label_id[str(value)]

    def encode(self, records: list[dict], source: str, training: bool = True) -> list[dict]:
        if not records:
            raise DataError(f"task {self.task.name!r}: {source} is empty; every split needs records")
        if self.task.type in IMAGE_TASK_TYPES and self.image is None:
            raise TaskError(f"task {self.task.name!r}: a {self.task.type} task needs a vision model (a `vision:` "
                            "recipe section or a base/model with vision files)")
        fn = getattr(self, f"_{self.task.type}")
        out = [fn(rec, f"{source} record {i}") for i, rec in enumerate(records, start=1)]
        if training and self.task.type == "chat":
            out = [e for e in out if any(lab != IGNORE for lab in e["labels"])]  # replies cut off by max_length
            if not out:
                raise DataError(f"task {self.task.name!r}: no assistant reply of {source} fits in max_length "
                                f"{self.task.max_length}; raise it")
        if training and self.task.type == "qa":
            out = [e for e in out if e["start"] >= 0]  # answers cut off by max_length cannot be learned
            if not out:
                raise DataError(f"task {self.task.name!r}: no answer of {source} fits in max_length "
                                f"{self.task.max_length}; raise it")
        return out

    def _classification(self, rec: dict, where: str) -> dict:
        text = str(_get(self.task, rec, "text", where))
        ids = self.tok.encode(text)[: self.task.max_length - 2]
        return {"input_ids": [self.tok.bos_token_id, *ids, self.tok.eos_token_id],
                "label": self._label(_get(self.task, rec, "label", where), where)}

    def _tagging(self, rec: dict, where: str) -> dict:
        words = _as_list(_get(self.task, rec, "tokens", where), where, "tokens")
        tags = _as_list(_get(self.task, rec, "tags", where), where, "tags")
        if len(words) != len(tags):
            raise DataError(f"{where}: {len(words)} tokens but {len(tags)} tags; each token needs one tag")
        if not words:
            raise DataError(f"{where}: a tagging record needs at least one token")
        tag_ids = [self._label(t, where) for t in tags]
        pieces = self.tok.encode_batch([w if i == 0 else " " + w for i, w in enumerate(words)])
        ids, labels, first = [self.tok.bos_token_id], [IGNORE], []
        for w_ids, tag in zip(pieces, tags):
            w_ids = w_ids or [self.tok.eos_token_id]
            if len(ids) + len(w_ids) > self.task.max_length - 1:
                break  # words beyond max_length are predicted as the first label ("O") at evaluation
            first.append(len(ids))
            cont = IGNORE
            if self.task.label_all_subwords:
                cont = self.label_id.get("I-" + tag[2:], self.label_id[tag]) if tag.startswith("B-") \
                    else self.label_id[tag]
            labels += [self.label_id[tag]] + [cont] * (len(w_ids) - 1)
            ids += w_ids
        ids, labels = ids + [self.tok.eos_token_id], labels + [IGNORE]  # the last word's lookahead token
        return {"input_ids": ids, "labels": labels, "first": first, "tags": tags, "tag_ids": tag_ids}

    def _qa(self, rec: dict, where: str) -> dict:
        context = str(_get(self.task, rec, "context", where))
        question = str(_get(self.task, rec, "question", where))
        texts, starts = answers_of(_get(self.task, rec, "answers", where), where)
        char_starts = [find_answer(context, t, s, where) for t, s in zip(texts, starts)]
        q_ids = [self.tok.bos_token_id, *self.tok.encode(question)[: self.task.max_length // 3], self.sep]
        enc = self.tok._tok.encode(context, add_special_tokens=False)  # offsets: (char start, char end) per token
        room = self.task.max_length - len(q_ids) - 1
        c_ids, offsets = enc.ids[:room] + [self.tok.eos_token_id], enc.offsets[:room]
        a0, a1 = char_starts[0], char_starts[0] + len(texts[0])
        covering = [i for i, (s, e) in enumerate(offsets) if s < a1 and e > a0]
        start = end = -1
        if covering and offsets[covering[-1]][1] >= a1:
            start, end = len(q_ids) + covering[0], len(q_ids) + covering[-1]
        return {"input_ids": q_ids + c_ids, "start": start, "end": end, "context_start": len(q_ids),
                "offsets": [list(o) for o in offsets], "context": context, "answers": texts}

    def _generation(self, rec: dict, where: str) -> dict:
        source = str(_get(self.task, rec, "source", where))
        target = str(_get(self.task, rec, "target", where))
        src = self.tok.encode(self.task.prompt.format(source=source))
        tgt = self.tok.encode(target)[: self.task.max_length // 2 - 1] + [self.tok.eos_token_id]
        src = src[: self.task.max_length - len(tgt) - 2]
        prompt = [self.tok.bos_token_id, *src, self.sep]
        return {"input_ids": prompt + tgt, "labels": [IGNORE] * len(prompt) + tgt, "prompt_len": len(prompt),
                "source": source, "target": target}

    def _chat(self, rec: dict, where: str) -> dict:
        """Render the conversation piece by piece with the chat template: each assistant turn is the
        text between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1])."""
        messages = _chat_messages(_get(self.task, rec, "messages", where), where)
        ids: list[int] = []
        labels: list[int] = []
        done, prompt_len = "", 0
        render = self.tok.apply_chat_template
        try:
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                prefix = render(messages[:i], add_generation_prompt=True)
                upto = render(messages[: i + 1], add_generation_prompt=False)
                if not prefix.startswith(done) or not upto.startswith(prefix):
                    raise TaskError(f"task {self.task.name!r}: the chat template does not render a conversation "
                                    "as a prefix of its continuation, so assistant turns cannot be located; use "
                                    "a template where each turn only appends text")
                context, reply = self.tok.encode(prefix[len(done):]), self.tok.encode(upto[len(prefix):])
                ids += context
                labels += [IGNORE] * len(context)
                prompt_len = len(ids)
                ids += reply
                labels += reply
                done = upto
        except TaskError:
            raise
        except SeekformerError as e:  # the template refused the conversation
            raise DataError(f"{where}: {e}") from None
        li = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        last = messages[li]
        source = next((m.get("content") for m in reversed(messages[:li]) if m["role"] == "user"), "")
        n = self.task.max_length
        return {"input_ids": ids[:n], "labels": labels[:n], "prompt_len": min(prompt_len, n),
                "source": str(source or ""), "target": str(last.get("content") or "")}


    # ------------------------------------------------------------------ image tasks (data/images.py)
    def _pixels(self, rec: dict, where: str):
        from .images import ImageError, load_image

        cfg = self.image.config
        path = _get(self.task, rec, "image", where)
        key = (str(path), cfg.image_size, cfg.channels)
        cache = self.__dict__.setdefault("_image_cache", {})  # VQA: one image has several questions
        if key not in cache:
            try:
                cache[key] = load_image(path, cfg.image_size, cfg.channels)
            except ImageError as e:
                raise ImageError(f"{where}: {e}") from None
        return cache[key]

    def _image_ids(self) -> list[int]:
        return [self.image.image_token_id] * self.image.config.num_image_tokens

    def _image_classification(self, rec: dict, where: str) -> dict:
        return {"input_ids": [self.tok.bos_token_id, *self._image_ids(), self.tok.eos_token_id],
                "pixels": self._pixels(rec, where), "label": self._label(_get(self.task, rec, "label", where), where)}

    def _vqa(self, rec: dict, where: str) -> dict:
        from .images import image_chat_prompt

        question = str(_get(self.task, rec, "question", where))
        answer = str(_get(self.task, rec, "answer", where))
        marker = self.image.image_token_id
        prompt = []
        for t in self.tok.encode(image_chat_prompt(self.tok, question, text_first=self.image.config.text_first)):
            prompt += self._image_ids() if t == marker else [t]
        stop = self.tok.end_of_turn_token_id if self.tok.end_of_turn_token_id is not None else self.tok.eos_token_id
        tgt = self.tok.encode(answer)[: self.task.max_length // 2 - 1] + [stop]
        if len(prompt) + len(tgt) > self.task.max_length:
            raise TaskError(f"{where}: the image tokens and question take {len(prompt)} tokens, over task "
                            f"{self.task.name!r}'s max_length {self.task.max_length}; raise max_length")
        return {"input_ids": prompt + tgt, "labels": [IGNORE] * len(prompt) + tgt, "prompt_len": len(prompt),
                "pixels": self._pixels(rec, where), "question": question, "answers": [answer]}

def _chat_messages(value: Any, where: str) -> list[dict]:
    """Check a chat record's messages: a list of {"role", "content"} dicts with an assistant turn."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise DataError(f"{where}: message {k} must be an object with 'role' in {', '.join(CHAT_ROLES)}, "
                            f"got {m!r:.80}")
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")) \
                and not isinstance(content, list):
            raise DataError(f"{where}: message {k} ({m['role']}) needs a string 'content'")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; every chat "
                        "record needs at least one {\"role\": \"assistant\", \"content\": ...} message")
    return value



def load_split(task: TaskRecipe, source: str, split: str, max_examples: int | None, seed: int = 0) -> list[dict]:
    """Read a split and keep at most `max_examples` records (a seeded sample, original order)."""
    if task.type in IMAGE_TASK_TYPES:
        from .images import read_image_records

        records = read_image_records(source, task.type, task.fields)
    else:
        records = read_records(source, split)
    if not records:
        raise DataError(f"task {task.name!r}: the {split} split {source} is empty; every split needs records")
    if max_examples is not None and len(records) > max_examples:
        keep = sorted(random.Random(seed).sample(range(len(records)), max_examples))
        records = [records[i] for i in keep]
    return records


# ====================================================================== batches
def collate(examples: list[dict], task_type: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples: input_ids/attention_mask [B,T] plus the type's targets."""
    t = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "pixels" in examples[0]:  # image tasks: uint8 [C,S,S] each -> normalized float [B,C,S,S]
        from .images import normalize

        batch["pixel_values"] = normalize(torch.stack([e["pixels"] for e in examples]))
    if task_type in ("classification", "image_classification"):
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    elif task_type in ("tagging", "generation", "chat", "vqa"):
        labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    elif task_type == "qa":
        span = torch.zeros((len(examples), t), dtype=torch.bool)
        for i, e in enumerate(examples):
            span[i, e["context_start"]: e["context_start"] + len(e["offsets"])] = True
        batch["span_mask"] = span
        batch["start_positions"] = torch.tensor([e["start"] for e in examples])
        batch["end_positions"] = torch.tensor([e["end"] for e in examples])
    return batch


class TaskBatches:
    """An endless, seeded stream of training batches of one task (reshuffled every epoch)."""

    def __init__(self, examples: list[dict], task_type: str, batch_size: int, pad_id: int, seed: int = 0) -> None:
        self.examples, self.task_type, self.batch_size, self.pad_id = examples, task_type, batch_size, pad_id
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.examples)

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < min(self.batch_size, len(self.examples)):
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            picked.append(self.examples[self.order.pop()])
        return collate(picked, self.task_type, self.pad_id)

    def state_dict(self) -> dict:
        """The stream's position (for resume): RNG state, the rest of this epoch's order, the epoch."""
        return {"rng": random_state(self.rng), "order": list(self.order), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        set_random_state(self.rng, state["rng"])
        self.order, self.epoch = list(state["order"]), int(state["epoch"])


def random_state(rng: random.Random) -> list:
    """`rng.getstate()` as lists and ints (what torch.load(weights_only=True) reads back)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_random_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def eval_batches(examples: list[dict], task_type: str, batch_size: int,
                 pad_id: int) -> Iterator[tuple[list[dict], dict]]:
    """(examples, collated batch) in order, for evaluation."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        yield chunk, collate(chunk, task_type, pad_id)
