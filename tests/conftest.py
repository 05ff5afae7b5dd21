"""Shared fixtures: tiny configs and small real text, so every test runs in seconds on a CPU."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see seekformer/__init__.py

import pytest  # noqa: E402
import torch  # noqa: E402

from seekformer.config import SeekConfig

# Test models are tiny: one intra-op thread beats two (no OpenMP hand-offs), most of all on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _runtime_policies():
    """CLI commands set process-wide decode policies (threads, product form: "auto"); a test in the same process
    must not inherit them from an earlier one (they change what benchmarks time and report)."""
    from seekformer import runtime

    saved = runtime._decode_threads, runtime._product_form
    runtime._decode_threads, runtime._product_form = None, None
    yield
    runtime._decode_threads, runtime._product_form = saved


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`seekformer ARGS` in-process: (exit code, stdout, stderr)."""
    from seekformer.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def tiny_config(**overrides) -> SeekConfig:
    """A ~100k-parameter DeepSeek-V3 config with every feature on (MoE, groups, shared expert, MTP off)."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=None,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(overrides)
    return SeekConfig(**base)


@pytest.fixture
def small_text() -> str:
    """About 60 kB of real English from the embedded corpus."""
    from seekformer.data.builtin import read_corpus_documents

    out, size = [], 0
    for doc in read_corpus_documents():
        out.append(doc[:6000])
        size += len(out[-1])
        if size > 60_000:
            break
    return "\n\n\n".join(out)


@pytest.fixture(scope="module")
def seek_model_dir(tmp_path_factory):
    """A 2-layer random SeekForCausalLM (hidden 48) + a 512-token BPE tokenizer, saved together (one per test
    module, so a module that writes next to it cannot disturb another)."""
    from seekformer.serving.demo import build_demo_model_dir

    return build_demo_model_dir(tmp_path_factory.mktemp("seek-model"))
