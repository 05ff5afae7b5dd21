"""Weight-only quantization (nn/quant.py, compress/quantize.py) and GGUF export (compress/gguf.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from seekformer.cli import main
from seekformer.compress.quantize import dir_size, quantize_model
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.nn import quant, quant_kernels
from seekformer.serving.demo import build_demo_model_dir

from .conftest import tiny_config

DEMO = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, v_head_dim=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_demo_model_dir(tmp_path_factory.mktemp("float"), **DEMO)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bits,rows", [(8, 1), (8, 3), (8, 8), (8, 13), (4, 1), (4, 2), (4, 8), (4, 20)])
def test_quant_linear_matches_its_dequantized_weight(bits, rows):
    """The fused kernel (few rows), the dequantize+GEMM path (many rows) and F.linear on the dequantized
    weight agree (the int4 kernel takes its activations as int8 per group: within 2%); the quantized weight
    is close to the float one."""
    torch.manual_seed(bits * 100 + rows)
    lin = torch.nn.Linear(128, 96, bias=True)
    q = quant.QuantLinear(lin.weight, lin.bias, bits, group_size=64)
    x = torch.randn(rows, 128)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
        y = q(x)
        if bits == 4 and rows <= 2 * quant_kernels.KERNEL_ROWS and quant_kernels.kernels() is not None:
            assert _rel(y, ref) < 0.02
        else:
            assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
        assert _rel(q.dequantize(), lin.weight) < (0.01 if bits == 8 else 0.1)
        assert _rel(y, lin(x)) < (0.02 if bits == 8 else 0.15)


def test_kernel_builds_where_the_cpu_allows():
    lib = quant_kernels.kernels()
    if quant_kernels._cpu_ok():
        assert lib is not None, "gcc/AVX2 present but the int8/int4 kernel did not build"


def test_int4_nibble_pack_roundtrip():
    q = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(quant._unpack_nibbles(quant._pack_nibbles(q)), q)


def test_quant_experts_only_touch_routed_experts():
    torch.manual_seed(0)
    e, d, f = 8, 64, 32
    gu, down = torch.randn(e, 2 * f, d) * 0.1, torch.randn(e, d, f) * 0.1
    qe = quant.QuantExperts(gu, down, 4, 32)
    seen = []
    orig = qe._proj
    qe._proj = lambda name, ex, x: (seen.append(ex), orig(name, ex, x))[1]
    x = torch.randn(3, d)
    idx = torch.tensor([[1, 5], [5, 2], [1, 2]])
    w = torch.rand(3, 2)
    y = qe(x, idx, w)
    assert set(seen) == {1, 2, 5}
    ref = torch.zeros_like(x)
    for n in range(3):
        for k in range(2):
            ref[n] += w[n, k] * qe.expert_forward(int(idx[n, k]), x[n:n + 1])[0]
    assert torch.allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_logits_generate_save_load(bits, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(num_nextn_predict_layers=1)
    m = SeekForCausalLM(cfg).eval()
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        ref = m(ids).logits
        q = quantize_model(copy.deepcopy(m), bits, group_size=32)
        out = q(ids).logits
    assert _rel(out, ref) < (0.02 if bits == 8 else 0.2)
    assert q.config.quantization_config["bits"] == bits
    # the cached decode path (runner, quantized experts/head/embedding) equals the full forward
    g = q.generate(ids[:1], max_new_tokens=6)
    with torch.no_grad():
        full = q(g[:, :-1]).logits[0, -1].argmax()
    assert int(full) == int(g[0, -1])
    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "seekformer"
    r = SeekForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(r.lm_head, quant.QuantLinear) and isinstance(r.model.layers[1].mlp.experts, quant.QuantExperts)
    with torch.no_grad():
        assert torch.equal(r(ids).logits, out)
    assert torch.equal(r.generate(ids[:1], max_new_tokens=6), g)
    with pytest.raises(Exception, match="already quantized"):
        quantize_model(r, 8)


def test_cli_quantize_sizes_and_verbs(model_dir, tmp_path, capsys):
    out8, out4 = tmp_path / "int8", tmp_path / "int4"
    main(["compress", "quantize", str(model_dir), "--bits", "8", "--out", str(out8)])
    main(["compress", "quantize", str(model_dir), "--bits", "4", "--group-size", "32", "--out", str(out4)])
    base = dir_size(model_dir)
    # tiny dims: headers and scales weigh more than in real models (see docs/compress.md for the base preset)
    assert dir_size(out8) < 0.35 * base and dir_size(out4) < 0.85 * dir_size(out8)
    assert (out8 / "tokenizer.json").is_file()
    capsys.readouterr()
    main(["generate", str(out4), "--prompt", "Call me", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("args,needle", [
    (["--bits", "3"], "--bits must be 8 or 4"),
    (["--bits", "4", "--group-size", "48"], "multiple of 32"),
])
def test_cli_quantize_bad_input(model_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        main(["compress", "quantize", str(model_dir), *args, "--out", str(out)])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not out.exists()


def test_cli_quantize_already_quantized_and_unwritable(model_dir, tmp_path, capsys):
    out = tmp_path / "q8"
    main(["compress", "quantize", str(model_dir), "--bits", "8", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main(["compress", "quantize", str(out), "--bits", "4", "--out", str(tmp_path / "again")])
    assert e.value.code == 2 and "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["compress", "quantize", str(model_dir), "--bits", "8", "--out", str(blocker)])
    assert e.value.code == 2


# ====================================================================== GGUF
@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_gguf_export_reads_back(model_dir, tmp_path, out_type):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    main(["export", "gguf", str(model_dir), str(path), "--type", out_type])
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.") or "_id" in k
         or k.endswith(("model", "pre"))}
    m = SeekForCausalLM.from_pretrained(model_dir)
    cfg = m.config
    assert f["general.architecture"] == "deepseek2"
    assert f["deepseek2.attention.q_lora_rank"] == 0 and f["deepseek2.attention.kv_lora_rank"] == cfg.kv_lora_rank
    assert f["deepseek2.attention.head_count_kv"] == 1
    assert f["deepseek2.expert_count"] == cfg.n_routed_experts and f["deepseek2.expert_shared_count"] == 1
    assert f["deepseek2.expert_gating_func"] == 2 and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.bos_token_id"] == cfg.bos_token_id
    tensors = {t.name: t for t in r.tensors}
    assert "blk.1.exp_probs_b.bias" in tensors and "blk.1.ffn_gate_exps.weight" in tensors
    assert "blk.0.attn_kv_b.weight" not in tensors
    if out_type == "f32":  # values: k_b/v_b reassemble kv_b_proj; merged experts are the per-expert weights
        h, n, v, rr = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        k_b = torch.from_numpy(tensors["blk.0.attn_k_b.weight"].data.copy()).view(h, rr, n)
        v_b = torch.from_numpy(tensors["blk.0.attn_v_b.weight"].data.copy()).view(h, v, rr)
        kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(h * (n + v), rr)
        assert torch.equal(kv_b, m.model.layers[0].self_attn.kv_b_proj.weight)
        up = torch.from_numpy(tensors["blk.1.ffn_up_exps.weight"].data.copy())
        f_ = cfg.moe_intermediate_size
        assert torch.equal(up, m.model.layers[1].mlp.experts.gate_up_proj[:, f_:])
        n_tok = len(r.fields["tokenizer.ggml.tokens"].data)
        assert n_tok == cfg.vocab_size


def test_gguf_export_bad_type(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "gguf", str(model_dir), str(tmp_path / "m.gguf"), "--type", "q2"])
    assert e.value.code == 2 and "--type" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ====================================================================== pruning
@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return build_demo_model_dir(tmp_path_factory.mktemp("moe8"), n_routed_experts=8, n_group=2, topk_group=2,
                                num_hidden_layers=3, **DEMO)


def test_prune_routing_matches_transformers(moe_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "pruned"
    main(["compress", "prune", str(moe_dir), "--keep", "0.5", "--calibration", "builtin", "--max-tokens", "600",
          "--out", str(out)])
    stats = json.loads((out / "prune_stats.json").read_text())
    assert stats["n_routed_experts"] == 4 and stats["group_routing_kept"]
    layer = stats["statistics"]["model.layers.1.mlp"]
    kept = stats["kept"]["model.layers.1.mlp"]
    assert len(kept) == 4 and sum(1 for k in kept if k < 4) == 2  # two per group of four
    for grp in (range(0, 4), range(4, 8)):  # within a group, the kept ones are the most salient
        mine = [k for k in kept if k in grp]
        assert min(layer["saliency"][k] for k in mine) >= max(layer["saliency"][k] for k in grp if k not in mine)
    assert (out / "expert_usage.png").stat().st_size > 0
    src = SeekForCausalLM.from_pretrained(moe_dir)
    ours = SeekForCausalLM.from_pretrained(out)
    assert ours.config.n_routed_experts == 4 and ours.config.n_group == 2
    r_src, r_new = src.model.layers[1].mlp.gate, ours.model.layers[1].mlp.gate
    assert torch.equal(r_new.weight, r_src.weight[kept])
    assert torch.equal(r_new.e_score_correction_bias, r_src.e_score_correction_bias[kept])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-4


def test_prune_random_is_seeded_and_bad_input(moe_dir, model_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        main(["compress", "prune", str(moe_dir), "--keep", "4", "--method", "random", "--seed", "3",
              "--max-tokens", "200", "--out", str(d)])
    assert json.loads((a / "prune_stats.json").read_text())["kept"] == json.loads((b / "prune_stats.json").read_text())["kept"]
    dense = tmp_path / "dense"
    build_demo_model_dir(dense, first_k_dense_replace=2, **DEMO)
    capsys.readouterr()
    for src, keep, needle in [(moe_dir, "1.5", "--keep"), (moe_dir, "8", "below the expert count"),
                              (moe_dir, "0", "--keep"), (dense, "0.5", "dense")]:
        with pytest.raises(SystemExit) as e:
            main(["compress", "prune", str(src), "--keep", keep, "--out", str(tmp_path / "x")])
        assert e.value.code == 2 and needle in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_transformers_refuses_a_quantized_dir(model_dir, tmp_path):
    """transformers has no loader for these weights: it must fail loudly, not fill random weights."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "q"
    main(["compress", "quantize", str(model_dir), "--bits", "8", "--out", str(out)])
    with pytest.raises((ValueError, KeyError, OSError)):
        transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["f32", "f16"])
def test_llama_cpp_greedy_equals_seekformer(model_dir, tmp_path, out_type):
    """llama.cpp (llama-cpp-python) loads the export and continues a prompt exactly as seekformer, >= 32 tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from seekformer.compress.gguf import export_gguf
    from seekformer.tokenizer import SeekTokenizer

    tok = SeekTokenizer.load(model_dir)
    m = SeekForCausalLM.from_pretrained(model_dir)
    path = export_gguf(model_dir, tmp_path / "m.gguf", out_type)
    ids = [m.config.bos_token_id] + tok.encode("Call me Ishmael. Some years ago")
    ours = m.generate(torch.tensor([ids]), max_new_tokens=32, ignore_eos=True)[0, len(ids):].tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = []
    for _ in range(32):
        t = int(llm.scores[llm.n_tokens - 1].argmax())
        theirs.append(t)
        llm.eval([t])
    assert theirs == ours
