"""MTP self-speculative decoding: output == plain greedy; drafts == the MTP modules run without cache."""

from __future__ import annotations

import pytest
import torch

from seekformer.errors import GenerationError
from seekformer.inference import speculative as spec

from .test_inference import tiny_model  # noqa: F401

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22, 23], [3]]


@pytest.mark.parametrize("depth,k", [(1, 1), (2, 2), (2, 1), (1, 3), (2, 4)])
@pytest.mark.parametrize("mode", ["latent", "naive"])
def test_speculative_equals_greedy(depth, k, mode):
    model = tiny_model(num_nextn_predict_layers=depth)
    for eos in ([], [50, 97]):
        greedy = model.generate(PROMPTS, max_new_tokens=20, eos_token_id=eos, cache_mode=mode)
        out = model.generate(PROMPTS, max_new_tokens=20, eos_token_id=eos, speculative=True,
                             num_speculative_tokens=k, cache_mode=mode, return_dict=True)
        assert torch.equal(out.sequences, greedy)
        assert 0.0 <= out.stats["acceptance_rate"] <= 1.0


def _reference_drafts(model, tokens: list[int], k_max: int) -> list[int]:
    """Drafts for the confirmed tokens t_0..t_n, computed like training does (full sequence, no cache)."""
    n = len(tokens) - 1
    x = torch.tensor([tokens])
    h = model(x, return_hidden=True).hidden_states[:, :n]  # h^0_0 .. h^0_{n-1}
    ext, drafts = list(tokens), []
    for k, module in enumerate(model.mtp[:k_max], start=1):
        emb = model.model.embed_tokens(torch.tensor([ext[k:k + n]]))
        cos, sin = model.model.rotary_emb(torch.arange(n)[None], h.dtype)
        h = module(h, emb, cos, sin)
        d = int(model.lm_head(module.head_norm(h[:, -1])).argmax(-1))
        drafts.append(d)
        ext.append(d)
    return drafts


def _spy_drafts(monkeypatch) -> list:
    """Record (confirmed tokens, drafts) of every MTPDrafter.draft call."""
    seen = []
    real = spec.MTPDrafter.draft

    def spy(self, toks):
        drafts = real(self, toks)
        seen.append(([list(t) for t in toks], [list(d) for d in drafts]))
        return drafts

    monkeypatch.setattr(spec.MTPDrafter, "draft", spy)
    return seen


@pytest.mark.parametrize("depth", [1, 2])
def test_drafts_equal_uncached_mtp(depth, monkeypatch):
    model = tiny_model(seed=2, num_nextn_predict_layers=depth)
    seen = _spy_drafts(monkeypatch)
    model.generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=12, ignore_eos=True, speculative=True)
    assert len(seen) >= 6
    with torch.no_grad():
        for toks, drafts in seen:
            for t, d in zip(toks, drafts):
                assert d == _reference_drafts(model, t, depth)


def test_verification_with_oracle_drafts(monkeypatch):
    """Drafts taken from the true greedy continuation are all accepted; wrong ones are all rejected."""
    model = tiny_model(num_nextn_predict_layers=2)
    greedy = model.generate([PROMPTS[0]], max_new_tokens=24, ignore_eos=True)[0].tolist()
    for wrong in (False, True):
        def oracle(self, toks):
            out = []
            for t in toks:
                nxt = greedy[len(t): len(t) + self.k]
                nxt += [0] * (self.k - len(nxt))
                out.append([(i + 1) % 256 for i in nxt] if wrong else nxt)
            return out

        monkeypatch.setattr(spec.MTPDrafter, "draft", oracle)
        out = model.generate([PROMPTS[0]], max_new_tokens=24, ignore_eos=True, speculative=True, return_dict=True)
        assert out.sequences[0].tolist() == greedy
        rate = out.stats["acceptance_rate"]
        assert rate == 0.0 if wrong else rate > 0.9
        assert out.stats["tokens_per_forward"] == pytest.approx(1.0 if wrong else 24 / out.stats["main_forwards"])


def test_speculative_rejects_bad_use():
    with pytest.raises(GenerationError):
        tiny_model().generate([[5, 6]], speculative=True)  # no MTP modules
    model = tiny_model(num_nextn_predict_layers=1)
    with pytest.raises(GenerationError):
        model.generate([[5, 6]], speculative=True, do_sample=True)
    with pytest.raises(GenerationError):
        model.generate([[5, 6]], speculative=True, num_speculative_tokens=spec.MAX_DRAFTS + 1)


def _reference_chained_drafts(model, tokens: list[int], k: int) -> list[int]:
    """Drafts of a depth-1 model chained to k: the module runs again one position further on its own output
    and its last draft (no cache: the full sequence each time)."""
    n = len(tokens) - 1
    module = model.mtp[0]
    h_main = model(torch.tensor([tokens]), return_hidden=True).hidden_states[0, :n]  # h^0_0 .. h^0_{n-1}
    h_in, ids, drafts = h_main, list(tokens[1:]), []
    for _ in range(k):
        t = h_in.shape[0]
        cos, sin = model.model.rotary_emb(torch.arange(t)[None], h_in.dtype)
        out = module(h_in[None], model.model.embed_tokens(torch.tensor([ids])), cos, sin)[0]
        d = int(model.lm_head(module.head_norm(out[-1])).argmax(-1))
        drafts.append(d)
        h_in, ids = torch.cat([h_in, out[-1:]]), ids + [d]
    return drafts


def test_chained_drafts_equal_uncached_mtp(monkeypatch):
    model = tiny_model(seed=2, num_nextn_predict_layers=1)
    seen = _spy_drafts(monkeypatch)
    model.generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=12, ignore_eos=True, speculative=True,
                   num_speculative_tokens=3)
    assert len(seen) >= 3
    with torch.no_grad():
        for toks, drafts in seen:
            for t, d in zip(toks, drafts):
                assert d == _reference_chained_drafts(model, t, 3)
