"""Multiple-choice knowledge tests in the MMLU format, scored by log-likelihood.

A question has a subject, a stem, four choices and the letter of the right one. The prompt is the
one of Hendrycks et al. (and lm-evaluation-harness' `mmlu`):

    The following are multiple choice questions (with answers) about college biology.

    <K solved examples of the subject, each formatted as below with " <letter>" after "Answer:">

    <question>
    A. <choice>
    B. <choice>
    C. <choice>
    D. <choice>
    Answer:

and the prediction is the letter among " A", " B", " C", " D" the model finds most likely after it.
Accuracy is reported per subject, macro-averaged over subjects (each subject counts once) and
micro-averaged over questions.

Sources (`read_questions`):
* an MMLU-style CSV (no header; columns question, A, B, C, D, answer letter; the subject is the file
  name without a `_test` / `_dev` / `_val` suffix), as in the original `data/{dev,val,test}/` tarball;
* JSONL / JSON: objects with `question`, `choices` (a list) or `A`..`D`, `answer` (a letter or an index)
  and optionally `subject`;
* a directory: its `{split}/` folder, or its files named `*_{split}.csv`, or every CSV/JSONL in it;
* `hf:cais/mmlu` (or `hf:NAME[:CONFIG]`): a Hugging Face dataset with fields question, subject,
  choices, answer (needs `datasets` and, for the hub, a network connection).
Few-shot examples come from the `dev` split of the same source; when it has none, the first K
questions of each subject serve as examples and are not scored.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..inference.scoring import loglikelihood

LETTERS = "ABCDEFGHIJ"
_SPLIT_SUFFIX = re.compile(r"_(test|dev|val|validation|train)$")


@dataclass
class Question:
    """One multiple-choice question; `answer` is the index of the right choice."""

    question: str
    choices: list[str]
    answer: int
    subject: str = "general"


# ====================================================================== reading
def _answer_index(value, n_choices: int, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: answer must be a letter or an index, got {value!r}")
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and value.strip().upper() in LETTERS[:n_choices] and value.strip():
        idx = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    else:
        raise DataError(f"{where}: answer must be one of {', '.join(LETTERS[:n_choices])} or an index, got {value!r}")
    if not 0 <= idx < n_choices:
        raise DataError(f"{where}: answer index {idx} is outside the {n_choices} choices")
    return idx


def _subject_from_path(path: Path) -> str:
    return _SPLIT_SUFFIX.sub("", path.name.split(".")[0])


def _from_record(rec: dict, subject: str, where: str) -> Question:
    if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
        raise DataError(f"{where}: a question needs the fields 'question', 'choices' (or A-D) and 'answer'")
    choices = rec.get("choices")
    if choices is None:
        choices = [rec[k] for k in LETTERS if k in rec]
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: expected a list of at least 2 choices, got {choices!r:.80}")
    choices = [str(c) for c in choices]
    return Question(str(rec["question"]), choices, _answer_index(rec["answer"], len(choices), where),
                    str(rec.get("subject") or subject))


def _read_csv(path: Path) -> list[Question]:
    subject, out = _subject_from_path(path), []
    with open(path, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["question", "a"]):
                continue  # blank line or a header row
            if len(row) < 4:
                raise DataError(f"{path}:{n}: expected question, choices..., answer; got {len(row)} column(s)")
            out.append(_from_record({"question": row[0], "choices": row[1:-1], "answer": row[-1]}, subject,
                                    f"{path}:{n}"))
    return out


def _read_json(path: Path) -> list[Question]:
    subject, text = _subject_from_path(path), path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e})") from None
        records = data if isinstance(data, list) else data.get("questions", data.get("data", []))
        return [_from_record(r, subject, f"{path}[{i}]") for i, r in enumerate(records)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e})") from None
            out.append(_from_record(rec, subject, f"{path}:{n}"))
    return out


def _read_file(path: Path) -> list[Question]:
    if path.suffix == ".csv":
        return _read_csv(path)
    if path.suffix in (".jsonl", ".json"):
        return _read_json(path)
    raise DataError(f"{path}: expected a .csv, .jsonl or .json file of questions")


def _split_files(directory: Path, split: str) -> list[Path]:
    names = (split, "val") if split == "validation" else (split, "validation") if split == "val" else (split,)
    for name in names:
        sub = directory / name
        if sub.is_dir():
            return sorted(p for p in sub.iterdir() if p.suffix in (".csv", ".jsonl", ".json"))
        files = sorted(p for p in directory.iterdir() if p.suffix in (".csv", ".jsonl", ".json")
                       and _SPLIT_SUFFIX.search(p.name.split(".")[0]) and p.name.split(".")[0].endswith("_" + name))
        if files:
            return files
    return []


def _read_hf(source: str, split: str) -> list[Question]:
    parts = source[len("hf:"):].split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 else "all")
    try:
        import datasets
    except ImportError:
        raise DataError("reading hf: datasets needs `pip install seekformer[hf]`") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, unknown split...
        raise DataError(f"cannot load {name}:{config} split {split!r} ({str(e).splitlines()[0]}); "
                        "offline? pass a local MMLU folder or CSV/JSONL file instead") from None
    return [_from_record(dict(r), str(r.get("subject") or config), f"{name}[{i}]") for i, r in enumerate(ds)]


def read_questions(source: str | Path, split: str = "test", subjects: Iterable[str] | None = None) -> list[Question]:
    """Questions of `split` from `source` (see the module docstring), restricted to `subjects` if given."""
    src = str(source)
    if src.startswith("hf:"):
        questions = _read_hf(src, split)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise DataError(f"multiple-choice data {path} does not exist: pass an MMLU folder, a CSV/JSONL file "
                            "or hf:cais/mmlu")
        if path.is_dir():
            files = _split_files(path, split)
            if not files and split == "test":
                files = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".jsonl", ".json"))
        else:
            files = [path] if split == "test" else []
        questions = [q for f in files for q in _read_file(f)]
    if subjects:
        wanted = set(subjects)
        missing = wanted - {q.subject for q in questions}
        if missing and split == "test":
            raise DataError(f"no questions for subject(s) {', '.join(sorted(missing))} in {src}")
        questions = [q for q in questions if q.subject in wanted]
    if not questions and split == "test":
        raise DataError(f"no questions found in {src}")
    return questions


# ====================================================================== prompts
def format_question(q: Question, answer: bool = False) -> str:
    lines = [q.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[q.answer]}\n\n" if answer else "")


def build_prompt(q: Question, shots: Sequence[Question] = ()) -> str:
    """The zero- or few-shot prompt for `q` (ends with "Answer:")."""
    header = f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_question(s, answer=True) for s in shots) + format_question(q)


# ====================================================================== scoring
@dataclass
class MCResult:
    """Accuracy per subject, macro (mean over subjects) and micro (over questions)."""

    subjects: dict[str, dict] = field(default_factory=dict)  # subject -> {"correct", "total", "accuracy"}
    shots: int = 0
    predictions: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(s["total"] for s in self.subjects.values())

    @property
    def micro_accuracy(self) -> float:
        return sum(s["correct"] for s in self.subjects.values()) / max(1, self.total)

    @property
    def macro_accuracy(self) -> float:
        return statistics.fmean(s["accuracy"] for s in self.subjects.values()) if self.subjects else float("nan")

    def to_dict(self) -> dict:
        return {"macro_accuracy": self.macro_accuracy, "micro_accuracy": self.micro_accuracy, "questions": self.total,
                "shots": self.shots, "subjects": self.subjects}


def evaluate_multiple_choice(model, tokenizer, questions: Sequence[Question], shots: int = 0,
                             dev: Sequence[Question] = (), batch_size: int | None = None,
                             progress=None) -> MCResult:
    """Score `questions` with `shots` examples per prompt from `dev` (same subject; when a subject has
    fewer than `shots` dev questions, its first test questions are used as examples and not scored)."""
    if shots < 0:
        raise DataError(f"shots must be >= 0, got {shots}")
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in dev:
        by_subject[q.subject].append(q)
    todo: list[tuple[Question, list[Question]]] = []
    test_by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        test_by_subject[q.subject].append(q)
    for subject, qs in test_by_subject.items():
        examples = by_subject.get(subject, [])[:shots]
        if len(examples) < shots:
            examples, qs = qs[:shots], qs[shots:]
        todo.extend((q, examples) for q in qs)
    if not todo:
        raise DataError("no questions left to score (fewer questions than shots?)")
    prompts = [tokenizer.encode(build_prompt(q, ex)) for q, ex in todo]
    scores = _choice_scores(model, tokenizer, prompts, [q for q, _ in todo], batch_size, progress)
    result = MCResult(shots=shots)
    for (q, _), s in zip(todo, scores):
        pred = max(range(len(s)), key=s.__getitem__)
        result.predictions.append(pred)
        entry = result.subjects.setdefault(q.subject, {"correct": 0, "total": 0, "accuracy": 0.0})
        entry["correct"] += int(pred == q.answer)
        entry["total"] += 1
    for entry in result.subjects.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    result.subjects = dict(sorted(result.subjects.items()))
    return result


def _choice_scores(model, tokenizer, prompts: list[list[int]], questions: list[Question], batch_size, progress,
                   chunk: int = 64) -> list[list[float]]:
    """log p(" <letter>" | prompt) for every choice of every question (one forward per prompt when the
    letters are single tokens, see `loglikelihood`), `chunk` questions at a time for progress reports."""
    letter_ids = [tokenizer.encode(" " + LETTERS[i]) for i in range(max(len(q.choices) for q in questions))]
    out: list[list[float]] = []
    for start in range(0, len(prompts), chunk):
        part = list(zip(prompts[start:start + chunk], questions[start:start + chunk]))
        reqs = [(p, letter_ids[i]) for p, q in part for i in range(len(q.choices))]
        flat = iter(lp for lp, _ in loglikelihood(model, reqs, batch_size))
        out.extend([next(flat) for _ in q.choices] for _, q in part)
        if progress is not None:
            progress(len(out))
    return out
