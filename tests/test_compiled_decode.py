"""The compiled decoding step (inference/compiled.py): same tokens as the eager step, eager fallback, option
plumbing. The fast tests run the traced function eagerly (torch.compile replaced by the identity); the real
inductor compilation (tens of seconds) is the slow test."""

from __future__ import annotations

import warnings

import pytest
import torch

from .conftest import tiny_config
from seekformer.inference import compiled
from seekformer.inference.decoding import new_cache
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.nn.static_decode import gathered_experts


def _model(**overrides) -> SeekForCausalLM:
    torch.manual_seed(0)
    model = SeekForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # non-zero correction biases and routing that differs per token
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model


@pytest.fixture
def traced_eagerly(monkeypatch):
    """torch.compile -> the function itself: the graph function runs as plain PyTorch (fast)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


def _prompt(model, b: int = 1, t: int = 7) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(b * 10 + t))


def test_gathered_experts_equal_dispatch():
    model = _model()
    moe = model.moe_layers()[0][1]
    x = torch.randn(5, model.config.hidden_size)
    r = moe.gate(x)
    with torch.no_grad():
        want = moe.experts(x, r.indices, r.weights)
        got = gathered_experts(moe.experts, x, r.indices, r.weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 24}, {"n_routed_experts": 16, "num_experts_per_tok": 4}])
def test_graph_step_equals_eager_step(traced_eagerly, overrides):
    """Step by step on two caches: logits, hidden states and the written latents equal the eager decode_step."""
    model = _model(**overrides)
    step = compiled.CompiledStep(model)
    ids = _prompt(model)
    c_eager, c_graph = new_cache(model, 1, 20), new_cache(model, 1, 20)
    with torch.no_grad():
        model(ids, cache=c_eager)
        model(ids, cache=c_graph)
        tok = ids[:, -1:]
        for _ in range(6):
            want, h_want = model.decode_step(tok, c_eager, return_hidden=True)
            got, h_got = step(tok, c_graph, return_hidden=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h_got, h_want, rtol=1e-5, atol=1e-5)
            tok = want.argmax(-1, keepdim=True)
    assert torch.equal(c_eager.lengths, c_graph.lengths) and torch.equal(c_eager.valid, c_graph.valid)
    for a, b in zip(c_eager.k, c_graph.k):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert step.calls == 6 and step.first_seconds is not None


def test_generate_compile_same_tokens_and_batches(traced_eagerly):
    """generate(compile=True) == eager greedy, batch 1 and a left-padded batch 2 (rows of different lengths)."""
    model = _model()
    ids = _prompt(model, 1, 9)
    assert torch.equal(model.generate(ids, max_new_tokens=12, ignore_eos=True, compile=True),
                       model.generate(ids, max_new_tokens=12, ignore_eos=True))
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    assert torch.equal(model.generate(rows, max_new_tokens=10, ignore_eos=True, compile=True),
                       model.generate(rows, max_new_tokens=10, ignore_eos=True))
    assert model.__dict__["_compiled_step"].calls > 0


def test_fallback_warns_once_and_decodes(monkeypatch):
    """A compiler that fails: one warning line, then the eager step; the tokens are the eager ones."""
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C compiler\nsecond line of a long traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = _model()
    ids = _prompt(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(ids, max_new_tokens=8, ignore_eos=True, compile=True)
    msgs = [str(w.message) for w in caught if "compiled decoding" in str(w.message)]
    assert msgs == ["compiled decoding unavailable, using the eager step (RuntimeError: no C compiler)"]
    assert torch.equal(out, model.generate(ids, max_new_tokens=8, ignore_eos=True))
    assert compiled.compiled_step(model, True) is None  # remembered: no second attempt


def test_quantized_model_is_not_compiled():
    from seekformer.nn.quant import quantize_modules_

    model = _model()
    quantize_modules_(model, {"bits": 8})
    assert model.static_step_blocker() is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compiled.compiled_step(model, True) is None
    assert any("compiled decoding unavailable" in str(w.message) for w in caught)


def test_off_by_default_and_process_switch(traced_eagerly):
    model = _model()
    assert compiled.compiled_step(model) is None
    compiled.set_compile(True)
    try:
        assert compiled.compiled_step(model) is not None
    finally:
        compiled.set_compile(False)


def test_engine_compile_same_tokens(traced_eagerly):
    from seekformer.inference import Engine, SamplingParams

    model = _model()
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    outs = []
    for flag in (False, True):
        eng = Engine(model, max_batch_size=2, max_length=64, compile=flag)
        outs.append(eng.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True)))
    assert [c.token_ids for c in outs[0]] == [c.token_ids for c in outs[1]]
    assert all(len(c.token_ids) == 6 for c in outs[0])
    assert model.__dict__["_compiled_step"].calls > 0


def test_cli_generate_compile_flag(seek_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from seekformer.cli import app

    from seekformer import runtime

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    for name in ("_product_form", "_decode_threads"):  # the CLI sets them: restored after the test
        monkeypatch.setattr(runtime, name, getattr(runtime, name))
    runner = CliRunner()
    args = ["generate", str(seek_model_dir), "--prompt", "hello", "--max-new-tokens", "6", "--threads", "1"]
    plain = runner.invoke(app, args)
    comp = runner.invoke(app, args + ["--compile"])
    compiled.set_compile(False)
    assert plain.exit_code == 0 and comp.exit_code == 0, comp.output
    assert plain.stdout == comp.stdout


@pytest.mark.slow
def test_inductor_compiled_greedy_equals_eager():
    """The real thing: inductor-compiled steps give eager's greedy tokens (batch 1 and 2)."""
    model = _model(num_hidden_layers=2)
    ids = _prompt(model, 1, 9)
    assert torch.equal(model.generate(ids, max_new_tokens=16, ignore_eos=True, compile=True),
                       model.generate(ids, max_new_tokens=16, ignore_eos=True))
    step = model.__dict__["_compiled_step"]
    assert step.failed is None and step.calls == 15
    ids2 = _prompt(model, 2, 5)
    assert torch.equal(model.generate(ids2, max_new_tokens=8, ignore_eos=True, compile=True),
                       model.generate(ids2, max_new_tokens=8, ignore_eos=True))
