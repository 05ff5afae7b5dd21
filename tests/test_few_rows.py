"""few_rows_linear: the decoding-step form of F.linear (W @ X^T for a few rows) gives F.linear's values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seekformer.nn import few_rows
from seekformer.nn.few_rows import few_rows_linear
from seekformer.nn.mlp import MLP


@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (3, 1, 96), (2, 5, 96), (40, 96), (0, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(shape, bias):
    torch.manual_seed(0)
    w = torch.randn(1536, 96)
    b = torch.randn(1536) if bias else None
    x = torch.randn(*shape)
    with torch.no_grad():
        got = few_rows_linear(x, w, b)
    ref = F.linear(x, w, b)
    assert got.shape == ref.shape and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_takes_the_mm_path_only_where_it_pays(monkeypatch):
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(few_rows.torch, "mm", lambda a, b: calls.append((tuple(a.shape), tuple(b.shape))) or real_mm(a, b))
    x, wide, narrow = torch.randn(1, 64), torch.randn(few_rows.MIN_OUT, 64), torch.randn(few_rows.MIN_OUT - 1, 64)
    with torch.no_grad():
        few_rows_linear(x, wide)
        few_rows_linear(x, narrow)  # narrow output: F.linear
        few_rows_linear(torch.randn(few_rows.FEW_ROWS + 1, 64), wide)  # many rows: F.linear
        few_rows_linear(x.bfloat16(), wide.bfloat16())  # bf16: F.linear
    assert calls == [((few_rows.MIN_OUT, 64), (64, 2))]  # one row, duplicated
    w = torch.randn(few_rows.MIN_OUT, 64, requires_grad=True)
    y = few_rows_linear(x, w)  # with gradients: F.linear, which autograd tracks
    y.sum().backward()
    assert w.grad is not None and len(calls) == 1


def test_mlp_step_equals_the_module():
    torch.manual_seed(0)
    mlp = MLP(64, 1100)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(mlp.step(x), mlp(x), rtol=1e-5, atol=1e-5)


def test_decoding_through_wide_weights_equals_the_uncached_argmax_chain():
    """A model whose output head and attention input projection are wide enough for the mm path: greedy
    decoding (1 row per step, then a batch of 3) equals argmax over full recomputation."""
    from .test_inference import tiny_model

    model = tiny_model(vocab_size=2048)
    assert model.lm_head.weight.shape[0] >= few_rows.MIN_OUT
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    out = model.generate(prompts, max_new_tokens=12, ignore_eos=True)
    for row, p in zip(out, prompts):
        seq = list(p)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert row[-(len(p) + 12):].tolist() == seq
    single = model.generate([prompts[0]], max_new_tokens=12, ignore_eos=True)
    assert single[0].tolist() == out[0][-16:].tolist()


def test_use_switches_the_form_off_for_a_block(monkeypatch):
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(few_rows.torch, "mm", lambda a, b: calls.append(1) or real_mm(a, b))
    x, w = torch.randn(1, 64), torch.randn(few_rows.MIN_OUT, 64)
    with torch.no_grad():
        with few_rows.use(False):
            assert not few_rows.enabled()
            torch.testing.assert_close(few_rows_linear(x, w), F.linear(x, w))
            with few_rows.use(None):  # None: as set
                few_rows_linear(x, w)
        assert few_rows.enabled()
        few_rows_linear(x, w)
    assert len(calls) == 1


def test_product_form_measured_once_per_model_and_forced_by_policy():
    """runtime.set_product_form("auto"): the decoder times both forms on the model's step once, keeps the faster
    and records the timings; True/False force it; greedy tokens are the same either way."""
    from seekformer import runtime
    from seekformer.inference.decoding import product_form

    from .test_inference import tiny_model

    model = tiny_model(vocab_size=2048)
    ids = [[5, 6, 7, 8]]
    want = model.generate(ids, max_new_tokens=8, ignore_eos=True)
    seen = []
    real_use = few_rows.use

    class spy(real_use):
        def __enter__(self):
            super().__enter__()
            seen.append(few_rows.enabled())

    try:
        runtime.set_product_form("auto")
        first = product_form(model)
        record = model.__dict__["_decode_products"][torch.get_num_threads()]
        assert record["few_row_form"] is first and set(record["seconds"]) == {True, False}
        assert product_form(model) is first  # measured once
        assert torch.equal(model.generate(ids, max_new_tokens=8, ignore_eos=True), want)
        for forced in (False, True):
            runtime.set_product_form(forced)
            few_rows.use = spy
            seen.clear()
            assert torch.equal(model.generate(ids, max_new_tokens=8, ignore_eos=True), want)
            few_rows.use = real_use
            assert seen and set(seen) == {forced}
    finally:
        few_rows.use = real_use
        runtime.set_product_form(None)


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (2, 96)])
def test_one_row_reduction_in_a_compiled_graph(shape):
    """Inside a captured graph one row takes the reduction form (a generated kernel); its values are
    F.linear's, and eager code (no capture) never takes it."""
    torch.manual_seed(0)
    w, b, x = torch.randn(1536, 96), torch.randn(1536), torch.randn(*shape)
    seen = []

    def backend(gm, example_inputs):
        seen.append({n.target for n in gm.graph.nodes if n.op == "call_function"})
        return gm

    with torch.no_grad():
        got = torch.compile(few_rows_linear, backend=backend, fullgraph=True, dynamic=False)(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert not few_rows.reduces(1)  # outside a capture (eager) one row keeps the product forms
    reduced = torch.ops.aten.mm.default not in seen[0] and torch.mm not in seen[0] and F.linear not in seen[0]
    assert reduced == (x.numel() == 96)  # one row: no product op in the graph; two rows: W @ X^T as before
    with few_rows.use(None, reduce_rows=0):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(few_rows_linear, backend=backend, fullgraph=True, dynamic=False)(x, w, b)
    assert torch.mm in seen[-1] or F.linear in seen[-1]  # switched off: the product ops
    torch._dynamo.reset()
