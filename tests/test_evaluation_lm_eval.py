"""lm-evaluation-harness on tasks defined on local files: the `seekformer` model adapter
(loglikelihood, loglikelihood_rolling, generate_until) and `local-completions` against `seekformer serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.evaluator import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import seekformer.evaluation.lm_eval_adapter  # noqa: E402,F401  (registers --model seekformer)
from seekformer.evaluation.perplexity import evaluate_perplexity
from seekformer.inference.scoring import loglikelihood  # noqa: E402
from seekformer.inference import generate_text  # noqa: E402
from seekformer.serving.server import load_model_dir  # noqa: E402

QUESTIONS = [
    {"question": "What is two plus two?", "choices": ["three", "four", "five", "six"], "answer": 1},
    {"question": "Which animal barks?", "choices": ["cat", "dog", "fish", "bird"], "answer": 1},
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "Oslo", "Lima"], "answer": 0},
]
DOCS = ["Call me Ishmael. Some years ago, never mind how long precisely.",
        "To be, or not to be, that is the question."]

TASKS = {
    "seek_mc": """
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
    "seek_ppl": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "seek_gen": """
output_type: generate_until
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three custom tasks on local JSONL files (`dataset_path: json`, `dataset_kwargs.data_files`)."""
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    data = {"seek_mc": QUESTIONS, "seek_ppl": [{"text": t} for t in DOCS],
            "seek_gen": [{"question": q["question"], "target": q["choices"][q["answer"]]} for q in QUESTIONS]}
    for name, body in TASKS.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[name]))
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / (name + '.jsonl')}\n"
                "test_split: test\n")
        (d / f"{name}.yaml").write_text(head + body.format())
    return d


def _evaluate(model: str, model_args: dict, task_dir, tasks=("seek_mc", "seek_ppl", "seek_gen")) -> dict:
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), task_manager=tm,
                           log_samples=True, device="cpu", batch_size=4)


def test_seekformer_adapter_on_local_tasks(seek_model_dir, task_dir):
    model, tok = load_model_dir(seek_model_dir)
    out = _evaluate("seekformer", {"pretrained": str(seek_model_dir)}, task_dir)
    res, samples = out["results"], out["samples"]
    assert 0.0 <= res["seek_mc"]["acc,none"] <= 1.0
    # loglikelihood: the adapter's answers are seekformer's scores of (question, " choice")
    s = samples["seek_mc"][0]
    ctx = tok.encode(QUESTIONS[s["doc_id"]]["question"] + "\nAnswer:")
    for choice, resp in zip(QUESTIONS[s["doc_id"]]["choices"], s["resps"]):
        (lp, greedy), = loglikelihood(model, [(ctx, tok.encode(" " + choice))])
        assert resp[0][0] == pytest.approx(lp, abs=1e-4) and resp[0][1] == greedy
    # loglikelihood_rolling: whole-document log-likelihood after the BOS token
    for s in samples["seek_ppl"]:
        text = DOCS[s["doc_id"]]
        ref = evaluate_perplexity(model, tok, [text], prefix_token_id=tok.bos_token_id)
        assert s["resps"][0][0] == pytest.approx(-ref.nll, rel=1e-4)
    assert res["seek_ppl"]["bits_per_byte,none"] > 0
    # generate_until: greedy decoding cut at the first newline
    for s in samples["seek_gen"]:
        prompt = QUESTIONS[s["doc_id"]]["question"] + "\nAnswer:"
        expected = generate_text(model, tok, prompt, max_new_tokens=8, stop=["\n"])
        assert s["resps"][0][0] == expected


def test_local_completions_against_seekformer_serve(seek_model_dir, task_dir):
    """`lm_eval --model local-completions` needs nothing from seekformer but the server (and its /tokenize)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("tenacity")  # lm-eval[api]
    from seekformer.serving import ServerConfig, ServerThread, create_app

    model, tok = load_model_dir(seek_model_dir)
    ours = _evaluate("seekformer", {"pretrained": str(seek_model_dir)}, task_dir, ("seek_mc",))
    with ServerThread(create_app(model, tok, ServerConfig(model_name="tiny"))) as srv:
        theirs = _evaluate("local-completions", {"model": "tiny", "base_url": srv.url + "/v1/completions",
                                                 "max_length": 512}, task_dir, ("seek_mc",))
    a = [r[0][0] for s in ours["samples"]["seek_mc"] for r in s["resps"]]
    b = [r[0][0] for s in theirs["samples"]["seek_mc"] for r in s["resps"]]
    assert b == pytest.approx(a, abs=1e-3)
    assert theirs["results"]["seek_mc"]["acc,none"] == ours["results"]["seek_mc"]["acc,none"]


def _lm_eval_executable():
    exe = Path(sys.executable).with_name("lm_eval")
    return exe if exe.exists() else None


def test_installed_hook_registers_seekformer_in_a_fresh_interpreter():
    """The `seekformer_lm_eval.pth` installed with the package makes lm-eval's registry know `seekformer`
    in any interpreter, without importing seekformer or torch until lm-eval asks for the model."""
    code = ("import sys, lm_eval.models; from lm_eval.api.registry import get_model, model_registry; "
            "assert 'seekformer' in model_registry, sorted(model_registry.keys()); "
            "heavy = 'torch' in sys.modules or 'seekformer' in sys.modules; "
            "cls = get_model('seekformer'); print(cls.__module__ + '.' + cls.__name__, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["seekformer.evaluation.lm_eval_adapter.SeekformerLM", "False"]
    off = subprocess.run([sys.executable, "-c", "import sys; print('_seekformer_lm_eval' in sys.modules)"],
                         capture_output=True, text=True, env={**os.environ, "SEEKFORMER_NO_LM_EVAL_HOOK": "1"})
    assert off.stdout.strip() == "True"  # imported, but installs nothing:
    off = subprocess.run([sys.executable, "-c", "import lm_eval.models; from lm_eval.api.registry import "
                          "model_registry; print('seekformer' in model_registry)"],
                         capture_output=True, text=True, env={**os.environ, "SEEKFORMER_NO_LM_EVAL_HOOK": "1"})
    assert off.stdout.strip() == "False", off.stderr[-2000:]


def test_lm_eval_command_line_runs_seekformer(seek_model_dir, task_dir, tmp_path):
    """The literal `lm_eval --model seekformer --model_args pretrained=DIR --tasks ...` (lm-eval's own
    command; it indexes lm-eval's task folder too, which takes some seconds)."""
    exe = _lm_eval_executable()
    if exe is None:
        pytest.skip("no lm_eval command beside this interpreter")
    cmd = [str(exe), "--model", "seekformer", "--model_args", f"pretrained={seek_model_dir}", "--tasks",
           "seek_mc", "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "seek_mc" in proc.stdout and "acc" in proc.stdout


@pytest.mark.slow
def test_python_m_adapter_is_lm_eval_command_line(seek_model_dir, task_dir, tmp_path):
    """`python -m seekformer.evaluation.lm_eval_adapter` is the same command line without the .pth hook."""
    cmd = [sys.executable, "-m", "seekformer.evaluation.lm_eval_adapter", "--model", "seekformer",
           "--model_args", f"pretrained={seek_model_dir}", "--tasks", "seek_mc", "--include_path", str(task_dir),
           "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "SEEKFORMER_NO_LM_EVAL_HOOK": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "seek_mc" in proc.stdout and "acc" in proc.stdout


def test_seekformer_adapter_agrees_with_lm_eval_hf_model(seek_model_dir, task_dir):
    """A seekformer checkpoint is a transformers DeepseekV3 directory: lm-eval's own `hf` model scores the
    same log-likelihoods (same prefix token, same rolling windows) as the `seekformer` adapter."""
    pytest.importorskip("transformers")
    tasks = ("seek_mc", "seek_ppl")
    ours = _evaluate("seekformer", {"pretrained": str(seek_model_dir)}, task_dir, tasks)
    hf = _evaluate("hf", {"pretrained": str(seek_model_dir)}, task_dir, tasks)

    def scores(out, task):
        return [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0])
                for s in out["samples"][task] for r in s["resps"]]

    for task in tasks:
        assert scores(ours, task) == pytest.approx(scores(hf, task), abs=1e-3)
