"""Perplexity (sliding window, bits per byte), the batched scorers, MMLU-format multiple choice and
`seekformer eval`, on a tiny random model with a tokenizer trained on a little built-in text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from seekformer.cli import main
from seekformer.errors import DataError
from seekformer.evaluation.multiple_choice import (
    Question, _choice_scores, build_prompt, evaluate_multiple_choice, read_questions,
)
from seekformer.evaluation.perplexity import evaluate_perplexity, rolling_windows
from seekformer.inference.scoring import loglikelihood, next_token_logprobs, score_tokens
from seekformer.serving.server import load_model_dir

TEXT = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse."


@pytest.fixture(scope="module")
def lm(seek_model_dir):
    return load_model_dir(seek_model_dir)


def _full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).double()


# ====================================================================== scorers
@pytest.mark.parametrize("n,window,stride", [(1, 4, 2), (10, 4, 4), (10, 4, 2), (10, 4, 1), (37, 8, 3), (5, 64, 32)])
def test_rolling_windows_score_every_token_once(n, window, stride):
    wins = rolling_windows(n, window, stride)
    scored = [t for b, e, first in wins for t in range(first, e)]
    assert scored == list(range(1, n + 1))
    for b, e, first in wins:
        assert e - b <= window and b < first  # every scored token has context inside its window
    with pytest.raises(Exception, match="stride"):
        rolling_windows(10, 4, 5)


def test_score_tokens_batched_equals_single(lm):
    model, tok = lm
    seqs = [tok.encode(TEXT), tok.encode("To be, or not to be"), tok.encode("Hi")]
    batched = score_tokens(model, seqs, top_n=3)
    for ids, s in zip(seqs, batched):
        ref = _full_logprobs(model, ids)
        assert torch.allclose(s.logprobs, ref, atol=1e-5)
        assert s.top_logprobs.shape == (len(ids) - 1, 3) and bool((s.top_logprobs[:, 0] >= s.logprobs - 1e-9).all())
        assert s.greedy.tolist() == (s.top_ids[:, 0] == torch.tensor(ids[1:])).tolist()


def test_loglikelihood_and_next_token_logprobs(lm):
    model, tok = lm
    ctx, cont = tok.encode("Call me"), tok.encode(" Ishmael.")
    (lp, greedy), = loglikelihood(model, [(ctx, cont)])
    ref = _full_logprobs(model, ctx + cont)[-len(cont):]
    assert lp == pytest.approx(float(ref.sum()), abs=1e-4)
    contexts = [tok.encode(TEXT), tok.encode("Call me"), tok.encode("A")]  # different lengths: left padding
    nxt = next_token_logprobs(model, contexts)
    for c, row in zip(contexts, nxt):
        with torch.no_grad():
            ref = model(torch.tensor([c])).logits[0, -1].float().log_softmax(-1)
        assert torch.allclose(row, ref, atol=1e-5)


def test_perplexity_with_and_without_sliding_window(lm):
    model, tok = lm
    ids = tok.encode(TEXT)
    one = evaluate_perplexity(model, tok, [TEXT], window=len(ids) + 1)
    nll = -float(_full_logprobs(model, [tok.eos_token_id] + ids).sum())
    assert one.tokens == len(ids) and one.bytes == len(TEXT.encode())
    assert one.nll == pytest.approx(nll, rel=1e-5)
    assert one.perplexity == pytest.approx(math.exp(nll / len(ids)), rel=1e-5)
    assert one.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-5)
    # disjoint chunks of 8 tokens (each after the last token of the previous chunk)
    chunks = evaluate_perplexity(model, tok, [TEXT], window=8, stride=8)
    full = [tok.eos_token_id] + ids
    manual = 0.0
    for b, e, first in rolling_windows(len(ids), 8, 8):
        manual -= float(_full_logprobs(model, full[b:e])[first - b - 1:].sum())
    assert chunks.nll == pytest.approx(manual, rel=1e-5) and chunks.tokens == len(ids)
    sliding = evaluate_perplexity(model, tok, [TEXT, TEXT], window=8, stride=2)
    assert sliding.documents == 2 and sliding.tokens == 2 * len(ids) and math.isfinite(sliding.perplexity)
    with pytest.raises(DataError):
        evaluate_perplexity(model, tok, ["", ""])


# ====================================================================== multiple choice
def _write_mmlu(root):
    """An MMLU-layout folder: dev/ and test/ with header-less CSVs named SUBJECT_SPLIT.csv."""
    (root / "dev").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "dev" / "astronomy_dev.csv").write_text('"Which is a planet?",Mars,Sirius,Vega,Moon,A\n')
    (root / "dev" / "geography_dev.csv").write_text('"Largest ocean?",Atlantic,Pacific,Indian,Arctic,B\n')
    (root / "test" / "astronomy_test.csv").write_text(
        '"Closest star to Earth?",Sun,Sirius,Vega,Polaris,A\n"Red planet?",Venus,Mars,Earth,Jupiter,B\n'
        '"Ringed planet?",Mercury,Mars,Saturn,Venus,C\n')
    (root / "test" / "geography_test.csv").write_text(
        'question,A,B,C,D,answer\n"Capital of France?",Rome,Paris,Oslo,Lima,B\n')
    return root


def test_read_questions_from_folders_csv_and_jsonl(tmp_path):
    root = _write_mmlu(tmp_path / "mmlu")
    qs = read_questions(root)
    assert [q.subject for q in qs] == ["astronomy"] * 3 + ["geography"]
    assert qs[1].choices == ["Venus", "Mars", "Earth", "Jupiter"] and qs[1].answer == 1
    assert [q.subject for q in read_questions(root, "dev")] == ["astronomy", "geography"]
    assert len(read_questions(root, subjects=["geography"])) == 1
    jl = tmp_path / "qs.jsonl"
    jl.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": "math"}) + "\n"
                  + json.dumps({"question": "1+1?", "A": "2", "B": "3", "C": "4", "D": "5", "answer": "A"}) + "\n")
    qs = read_questions(jl)
    assert [(q.subject, q.answer, len(q.choices)) for q in qs] == [("math", 1, 2), ("qs", 0, 4)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x", "choices": ["a", "b"], "answer": "E"}) + "\n")
    with pytest.raises(DataError, match="answer"):
        read_questions(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_questions(tmp_path / "missing")
    with pytest.raises(DataError, match="subject"):
        read_questions(root, subjects=["chemistry"])


def test_hf_mmlu_records_are_mapped(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 2}]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or rows)
    qs = read_questions("hf:cais/mmlu", "test")
    assert calls[0] == (("cais/mmlu", "all"), {"split": "test"})
    assert (qs[0].subject, qs[0].answer, qs[0].choices) == ("anatomy", 2, ["a", "b", "c", "d"])


def test_prompt_format_zero_and_few_shot():
    q = Question("Red planet?", ["Venus", "Mars", "Earth", "Jupiter"], 1, "astronomy")
    shot = Question("Which is a planet?", ["Mars", "Sirius", "Vega", "Moon"], 0, "astronomy")
    assert build_prompt(q) == ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                               "Red planet?\nA. Venus\nB. Mars\nC. Earth\nD. Jupiter\nAnswer:")
    assert build_prompt(q, [shot]).endswith("Which is a planet?\nA. Mars\nB. Sirius\nC. Vega\nD. Moon\nAnswer: A\n\n"
                                            "Red planet?\nA. Venus\nB. Mars\nC. Earth\nD. Jupiter\nAnswer:")


def test_multiple_choice_accuracy_matches_loglikelihood(lm, tmp_path):
    model, tok = lm
    root = _write_mmlu(tmp_path / "mmlu")
    qs, dev = read_questions(root), read_questions(root, "dev")
    res = evaluate_multiple_choice(model, tok, qs, shots=1, dev=dev)
    for q, pred in zip(qs, res.predictions):  # the prediction is the most likely " <letter>"
        ctx = tok.encode(build_prompt(q, [d for d in dev if d.subject == q.subject]))
        scores = [lp for lp, _ in loglikelihood(model, [(ctx, tok.encode(" " + "ABCD"[i])) for i in range(4)])]
        assert pred == max(range(4), key=scores.__getitem__)
    subj = res.subjects
    assert subj["astronomy"]["total"] == 3 and subj["geography"]["total"] == 1
    assert res.macro_accuracy == pytest.approx((subj["astronomy"]["accuracy"] + subj["geography"]["accuracy"]) / 2)
    assert res.micro_accuracy == pytest.approx(sum(s["correct"] for s in subj.values()) / 4)
    # without dev questions, the first test question of each subject becomes the example
    res0 = evaluate_multiple_choice(model, tok, qs, shots=1)
    assert res0.total == 2 and set(res0.subjects) == {"astronomy"}


def test_single_token_continuations_share_one_forward(lm):
    """loglikelihood() scores one-token continuations from one forward per distinct context."""
    model, tok = lm
    prompts = [tok.encode(build_prompt(Question("Red planet?", ["Venus", "Mars", "Earth"], 1, "astronomy"))),
               tok.encode("Capital of France? Think about it carefully.\nAnswer:")]
    letters = [tok.encode(" " + c) for c in "ABC"]
    assert all(len(ids) == 1 for ids in letters)
    got = loglikelihood(model, [(p, t) for p in prompts for t in letters])
    for k, (p, t) in enumerate((p, t) for p in prompts for t in letters):
        s = score_tokens(model, [p + t])[0]
        assert got[k][0] == pytest.approx(float(s.logprobs[-1]), abs=1e-4) and got[k][1] == bool(s.greedy[-1])
    qs = [Question("Red planet?", ["Venus", "Mars", "Earth"], 1, "astronomy")]
    assert _choice_scores(model, tok, prompts[:1], qs, None, None)[0] == pytest.approx([g[0] for g in got[:3]])


# ====================================================================== CLI
def _run_json(capsys, argv) -> dict:
    main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_eval_perplexity_and_mmlu(seek_model_dir, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text(TEXT)
    out = _run_json(capsys, ["eval", str(seek_model_dir), "--perplexity", str(text), "--window", "16",
                             "--stride", "8", "--json"])
    assert out["perplexity"]["tokens"] > 0 and out["perplexity"]["window"] == 16
    root = _write_mmlu(tmp_path / "mmlu")
    out = _run_json(capsys, ["eval", str(seek_model_dir), "--mmlu", str(root), "--shots", "1", "--subjects",
                             "astronomy,geography", "--json"])
    assert set(out["mmlu"]["subjects"]) == {"astronomy", "geography"} and 0 <= out["mmlu"]["macro_accuracy"] <= 1
    main(["eval", str(seek_model_dir), "--mmlu", str(root)])  # the table
    assert "macro average" in capsys.readouterr().out


def test_cli_eval_errors_and_task_delegation(seek_model_dir, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(seek_model_dir)])
    assert e.value.code == 2 and "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", str(seek_model_dir), "--mmlu", "/no/such/dir"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    import seekformer.cli.evaluate as evaluate

    calls = []
    monkeypatch.setattr(evaluate, "evaluate_task_cli",
                        lambda model_dir, task, data, json_out, **kw: calls.append((task, data, json_out)))
    main(["eval", str(seek_model_dir), "--task", "fortunes", "--data", "x.jsonl", "--json"])
    assert calls == [("fortunes", "x.jsonl", True)]
