"""Ctrl-C on the command line (issue 16 item 6): a real SIGINT sent to `seekformer generate|chat|finetune`.

generate prints "interrupted" and exits 130; chat stops the reply and keeps the session; finetune saves a
checkpoint first (even with train.save_every 0) and the resumed run matches an uninterrupted one exactly.
(pretrain: tests/test_checkpointing.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from seekformer import SeekForCausalLM
from seekformer.tokenizer import SeekTokenizer

from .conftest import tiny_config
from .test_finetune_cli import ROWS, write_jsonl
from .test_multitask import make_tiny_base


class Proc:
    """A `seekformer` subprocess whose stdout and stderr are collected by threads as they arrive."""

    def __init__(self, *args: str, stdin: bool = False) -> None:
        # SIGINT back to its default in the child: a test run started in the background (`bash .ci/run &`)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        self.p = subprocess.Popen([sys.executable, "-m", "seekformer", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  text=True, bufsize=1,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                         for s, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf: list[str]) -> None:
        while True:
            c = stream.read(1)
            if not c:
                return
            buf.append(c)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, predicate, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.p.poll() is not None:
                time.sleep(0.2)
                if predicate():
                    return
                raise AssertionError(f"exited early ({self.p.returncode}): {self.stderr[-2000:]}")
            if time.monotonic() > deadline:
                self.p.kill()
                raise AssertionError(f"timed out: {self.stderr[-2000:]}")
            time.sleep(0.05)

    def finish(self, timeout: float = 120.0) -> int:
        rc = self.p.wait(timeout)
        for t in self._threads:
            t.join(10)
        return rc


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A random tiny model with a 4096-token context: greedy replies run thousands of tokens (no eos)."""
    from seekformer.data.builtin import read_corpus_documents

    d = tmp_path_factory.mktemp("long-model")
    docs = [doc[:5000] for _, doc in zip(range(10), read_corpus_documents())]
    tok = SeekTokenizer.train(texts=docs, vocab_size=400, min_frequency=1)
    tok.save(d)
    torch.manual_seed(0)
    SeekForCausalLM(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=4096)).save_pretrained(d)
    return d


def test_ctrl_c_in_generate_exits_130(long_model):
    proc = Proc("generate", str(long_model), "--prompt", "the cat", "--max-new-tokens", "4000", "--threads", "1")
    proc.wait_for(lambda: len(proc.stdout) > 5)
    proc.p.send_signal(signal.SIGINT)
    assert proc.finish() == 130
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == "interrupted"


def test_ctrl_c_in_chat_stops_the_reply_not_the_session(long_model):
    proc = Proc("chat", str(long_model), "--temperature", "0", "--max-new-tokens", "4000", "--threads", "1",
                stdin=True)
    proc.p.stdin.write("hello there\n")
    proc.p.stdin.flush()
    proc.wait_for(lambda: len(proc.stdout) > 5)
    proc.p.send_signal(signal.SIGINT)
    proc.wait_for(lambda: "(reply interrupted)" in proc.stderr)
    proc.p.stdin.write("/reset\n")
    proc.p.stdin.close()
    assert proc.finish() == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("(conversation cleared)")
    assert "Traceback" not in proc.stderr and "interrupted\n" not in proc.stderr.replace("(reply interrupted)", "")


def test_ctrl_c_in_finetune_saves_and_resumes_exactly(tmp_path):
    """SIGINT after a few steps: exit 130 with a checkpoint (save_every 0); resuming in-process to step k+2
    gives the per-step losses of an uninterrupted run of k+2 steps (constant lr: the schedule is step-free)."""
    from seekformer.training.checkpointing import latest_checkpoint
    from seekformer.training.multitask import MultiTaskTrainer
    from seekformer.training.multitask_recipe import finetune_recipe_from_dict

    base = make_tiny_base(tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)

    def recipe(out, **t):
        return {"base": base, "out": str(tmp_path / out),
                "tasks": [{"name": "topic", "type": "classification", "train": train}],
                "train": {"steps": 100000, "batch_size": 4, "progress": False, "validate": False, "test": False,
                          "log_every": 1, "warmup_steps": 0, "min_lr_ratio": 1.0, "threads": 1, **t}}

    (tmp_path / "r.json").write_text(json.dumps(recipe("run")))
    proc = Proc("finetune", str(tmp_path / "r.json"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc.wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2)
    proc.p.send_signal(signal.SIGINT)
    assert proc.finish() == 130
    assert "Traceback" not in proc.stderr and "interrupted; state saved in" in proc.stderr.strip().splitlines()[-1]
    found = latest_checkpoint(tmp_path / "run")
    k = int(found.name.split("-")[1])
    assert k >= 2

    resumed = MultiTaskTrainer(finetune_recipe_from_dict(recipe("run", steps=k + 2, resume=True)))
    resumed.prepare()
    assert resumed.step == k
    resumed.run()
    ref = MultiTaskTrainer(finetune_recipe_from_dict(recipe("ref", steps=k + 2)))
    ref.run()

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
