"""`seekformer inspect`: JSON equal to what transformers computes on the same directory, PNGs, corpus
statistics, comparison, ablation, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from seekformer.serving.demo import build_demo_model_dir

from .conftest import run_cli

transformers = pytest.importorskip("transformers")

PROMPT = "The United States of America and the Congress"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_demo_model_dir(tmp_path_factory.mktemp("inspect-model"), max_position_embeddings=64,
                                num_hidden_layers=3, n_group=2, topk_group=1)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return build_demo_model_dir(tmp_path_factory.mktemp("dense-model"), first_k_dense_replace=2)


run = run_cli


def test_prompt_json_equals_transformers(model_dir, tmp_path, capsys):
    code, out, err = run(capsys, "inspect", model_dir, "--prompt", PROMPT, "--json", tmp_path / "r.json",
                         "--out", tmp_path / "png")
    assert code == 0, err
    rec = json.loads((tmp_path / "r.json").read_text())
    t = len(rec["token_ids"])
    assert len(rec["tokens"]) == t and rec["token_ids"][0] == 1  # bos first
    assert [x["layer"] for x in rec["layers"]] == [1, 2] and rec["note"] is None
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    routed = {}
    hooks = [hf.model.layers[i].mlp.gate.register_forward_hook(
        lambda m, a, o, i=i: routed.__setitem__(i, (o[2], o[1]))) for i in (1, 2)]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([rec["token_ids"]]), output_attentions=True, use_cache=False)
    for h in hooks:
        h.remove()
    for layer in rec["layers"]:
        idx, w = routed[layer["layer"]]
        assert [sorted(x) for x in layer["experts"]] == idx.sort(-1).values.tolist()
        mine = torch.tensor(layer["weights"]).sort(-1).values
        torch.testing.assert_close(mine, w.float().sort(-1).values, atol=2e-5, rtol=0)
        assert all(a >= b for row in layer["weights"] for a, b in zip(row, row[1:]))  # by decreasing weight
        assert len(layer["shared_share"]) == t
    assert len(rec["attention"]) == 3
    for mine, theirs in zip(rec["attention"], ref.attentions):
        assert float((torch.tensor(mine) - theirs[0]).abs().max()) <= 1e-4
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["attention_layer0_heads.png", "attention_layer0_mean.png", "attention_layer1_heads.png",
                    "attention_layer1_mean.png", "attention_layer2_heads.png", "attention_layer2_mean.png",
                    "routing_layer1.png", "routing_layer2.png"]
    assert all((tmp_path / "png" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_corpus_stats_compare_and_ablation(model_dir, tmp_path, capsys):
    code, out, err = run(capsys, "inspect", model_dir, "--corpus", "builtin:shakespeare", "--compare",
                         "builtin:sotu", "--max-tokens", "600", "--window", "64", "--json", tmp_path / "s.json",
                         "--out", tmp_path)
    assert code == 0, err
    res = json.loads((tmp_path / "s.json").read_text())
    for stats in res["corpora"].values():
        assert stats["tokens"] == 600
        for x in stats["layers"]:
            assert abs(sum(x["load"]) - 1) < 1e-5 and sum(x["counts"]) == 600 * 2
            assert 0 < x["entropy_norm"] <= 1 and x["max_over_mean"] >= 1 >= x["min_over_mean"]
            assert 0 <= x["same_expert_rate"] <= 1 and 0 < x["same_expert_chance"] <= 1
    comp = res["comparison"]
    assert [x["layer"] for x in comp["layers"]] == [1, 2] and all(0 <= x["js_divergence"] <= 1 for x in comp["layers"])
    assert "JS divergence" in out and (tmp_path / "routing_stats.png").is_file()
    code, out, err = run(capsys, "inspect", model_dir, "--corpus", "builtin:sotu", "--ablate-experts",
                         "--max-tokens", "200", "--window", "64", "--layer", "2", "--json", tmp_path / "a.json",
                         "--out", tmp_path)
    assert code == 0, err
    rep = json.loads((tmp_path / "a.json").read_text())
    assert [x["layer"] for x in rep["layers"]] == [2] and len(rep["layers"][0]["experts"]) == 4
    assert any(abs(x["delta"]) > 0 for x in rep["layers"][0]["experts"])
    assert (tmp_path / "ablation.png").is_file()


@pytest.mark.parametrize("extra,fragment", [
    (["--prompt", "word " * 80], "context is 64"),
    (["--prompt", "hi", "--layer", "9"], "unknown layer 9"),
    (["--corpus", "builtin:nope"], "no builtin corpus 'nope'"),
    (["--corpus", "builtin", "--window", "100"], "exceeds the model context 64"),
    (["--ablate-experts"], "need --corpus"),
    ([], "either --prompt"),
])
def test_bad_input_is_one_line(model_dir, capsys, extra, fragment):
    code, out, err = run(capsys, "inspect", model_dir, *extra)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_dense_model_says_so(dense_dir, tmp_path, capsys):
    code, out, err = run(capsys, "inspect", dense_dir, "--prompt", "hello", "--json", tmp_path / "d.json")
    assert code == 0 and "dense" in out
    rec = json.loads((tmp_path / "d.json").read_text())
    assert rec["layers"] == [] and "dense" in rec["note"] and len(rec["attention"]) == 2
    code, out, err = run(capsys, "inspect", dense_dir, "--corpus", "builtin", "--max-tokens", "100")
    assert code == 2 and "dense" in err
