"""Inference: latent/naive KV cache == full recompute, greedy/sampling/beam decoding, stops, streaming."""

from __future__ import annotations

import pytest
import torch

from seekformer import SeekForCausalLM
from seekformer.errors import GenerationError
from seekformer.inference import SamplingParams, generate, generate_text, stream
from seekformer.inference.beam import beam_search
from seekformer.inference.generate import prepare_inputs
from seekformer.inference.sampling import PenaltyState, apply_penalties, truncate
from seekformer.inference.stopping import Detokenizer, StopStringFilter
from seekformer.nn.kv_cache import KVCache

from .conftest import tiny_config


MULTIBYTE = "héllo wörld — naïve café 日本語 テキスト ok 😀 done. " * 4


def tiny_model(seed: int = 0, **overrides) -> SeekForCausalLM:
    """A random tiny model in eval mode (2-3 layers, hidden 64)."""
    torch.manual_seed(seed)
    return SeekForCausalLM(tiny_config(**overrides)).eval()


class ByteTok:
    """A small byte-level BPE (the `tokenizers` library) with seekformer's interface, for tests.

    Special tokens <|pad|>=0, <|bos|>=1, <|eos|>=2. `with_bytes=False` hides `token_bytes` so the
    window-decoding fallback of the streaming detokenizer is used.
    """

    def __init__(self, vocab_size: int = 320, with_bytes: bool = True) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([MULTIBYTE, "the cat sat on the mat. " * 20], trainer)
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.special_token_ids = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        table = {}
        printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        extra = 0
        for b in range(256):
            table[chr(b) if b in printable else chr(256 + (extra := extra + 1) - 1)] = b
        self._byte_of = table
        if not with_bytes:
            self.token_bytes = None
            del self.token_bytes

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes(self._byte_of[c] for c in self._tok.id_to_token(int(token_id)))


class WindowTok(ByteTok):
    """The same tokenizer without `token_bytes` (exercises the window decoding fallback)."""

    token_bytes = property(lambda self: (_ for _ in ()).throw(AttributeError("token_bytes")))


# ---------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("mode", ["latent", "naive"])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_cached_logits_equal_uncached(mode, q_lora_rank):
    model = tiny_model(q_lora_rank=q_lora_rank, rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                 "mscale": 1.0, "mscale_all_dim": 1.0,
                                                                 "original_max_position_embeddings": 128})
    ids = torch.randint(3, 256, (2, 24))
    am = torch.ones_like(ids)
    am[1, :5] = 0  # left padding
    with torch.no_grad():
        full = model(ids, am).logits
        cache = KVCache(model.config, 2, 64, mode=mode)
        parts, start = [], 0
        for size in (12, 3, 1, 1, 4, 1, 2):  # a long prefill (expanded latent), then absorbed chunks/steps
            parts.append(model(ids[:, start:start + size], am[:, start:start + size], cache=cache).logits)
            start += size
        inc = torch.cat(parts, dim=1)
    assert start == 24
    assert (inc - full)[am.bool()].abs().max() <= 1e-4


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_decode_step_equals_uncached(fold, q_lora_rank):
    """The model's decode step (fused norms, rope matrix, folded or per-head absorption, few-token MoE)."""
    model = tiny_model(q_lora_rank=q_lora_rank, attention_bias=True)
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases
            if p.dim() == 1:
                p.add_(0.01 * torch.randn_like(p))
    for m in model.modules():
        if hasattr(m, "decode_fold"):
            m.decode_fold = fold
    for b in (1, 5):  # 1 row: only the chosen experts run; 5 rows: the batched MoE
        ids = torch.randint(3, 256, (b, 16))
        with torch.no_grad():
            full = model(ids).logits
            cache = KVCache(model.config, b, 32)
            model(ids[:, :10], cache=cache)
            steps = [model.decode_step(ids[:, i:i + 1], cache) for i in range(10, 13)]
            chunk = model.decode_step(ids[:, 13:16], cache, last_only=False)
        inc = torch.cat([torch.stack(steps, 1), chunk], dim=1)
        assert (inc - full[:, 10:]).abs().max() <= 1e-4


@pytest.mark.parametrize("b", [1, 4])
def test_decode_step_equals_forward_with_cache(b):
    """`model.decode_step` (the step methods) == `model(ids, cache=...)` through the training modules' forward
    (expanded keys/values: gradients on), step by step: logits, hidden states and the cached latents."""
    model = tiny_model(seed=3, num_nextn_predict_layers=1)
    ids = torch.randint(3, 256, (b, 14))
    c_step, c_fwd = KVCache(model.config, b, 32), KVCache(model.config, b, 32)
    with torch.no_grad():
        model(ids[:, :8], cache=c_step)
        model(ids[:, :8], cache=c_fwd)
    for lo, hi in ((8, 9), (9, 10), (10, 13), (13, 14)):
        with torch.no_grad():
            logits, hidden = model.decode_step(ids[:, lo:hi], c_step, last_only=False, return_hidden=True)
        with torch.enable_grad():  # forces the forward path (no absorbed step)
            ref = model(ids[:, lo:hi], cache=c_fwd, return_hidden=True)
        torch.testing.assert_close(logits, ref.logits.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden, ref.hidden_states.detach(), rtol=1e-4, atol=1e-4)
    for a, r in zip(c_step.k, c_fwd.k):
        torch.testing.assert_close(a[:, :14], r[:, :14].detach(), rtol=1e-4, atol=1e-4)
    # the MTP step on its own one-layer cache == the module's forward on that cache
    cfg = model.config
    caches = [KVCache(cfg, b, 32, num_layers=1, first_layer=cfg.num_hidden_layers) for _ in range(2)]
    h = torch.randn(b, 3, cfg.hidden_size)
    am = torch.ones(b, 3, dtype=torch.long)
    with torch.no_grad():
        got_h, got_logits = model.mtp_step(0, h, ids[:, 1:4], am, caches[0])
    with torch.enable_grad():
        ref_h, ref_logits = model.mtp_step(0, h, ids[:, 1:4], am, caches[1])  # no_grad inside: the step path
    torch.testing.assert_close(got_h, ref_h)
    module = model.mtp[0]
    slots, pos, mask = caches[1].prepare(am)
    with torch.enable_grad():
        cos, sin = model.model.rotary_emb(pos, h.dtype)
        fwd = module(got_h, model.model.embed_tokens(ids[:, 4:7]), cos, sin, mask, caches[1], slots, am)
    caches[1].commit()
    with torch.no_grad():
        h2, _ = model.mtp_step(0, got_h, ids[:, 4:7], am, caches[0])
    torch.testing.assert_close(h2, fwd.detach(), rtol=1e-4, atol=1e-4)


def test_latent_cache_is_small():
    from seekformer.config import SeekConfig

    # per-head K/V over latent: H * (qk_head_dim + v_head_dim) / (kv_lora_rank + qk_rope_head_dim)
    for preset, ratio in (("tiny", 8.0), ("small", 8.0), ("deepseek-v3-671b", 40960 / 576)):
        cfg = SeekConfig.from_preset(preset)
        lat = KVCache(cfg, 1, 1, mode="latent", num_layers=1).bytes_per_token()
        naive = KVCache(cfg, 1, 1, mode="naive", num_layers=1).bytes_per_token()
        assert lat == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
        assert naive / lat == pytest.approx(ratio)


def test_cache_rollback_reorder_rows():
    cfg = tiny_config()
    c = KVCache(cfg, 3, 16, num_layers=1)
    slots, _, _ = c.prepare(torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]]))
    c.write(0, slots, torch.randn(3, 3, 40))
    c.commit()
    assert c.lengths.tolist() == [3, 3, 3] and c.next_position.tolist() == [2, 3, 3]
    c.rollback(torch.tensor([1, 0, 2]))
    assert c.lengths.tolist() == [2, 3, 1] and c.next_position.tolist() == [1, 3, 1]
    view = c.rows(1, 3)
    view.prepare(torch.ones(2, 1, dtype=torch.long))
    view.commit()
    assert c.lengths.tolist() == [2, 4, 2]
    before = c.k[0][2, :2].clone()
    c.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(c.k[0][0, :2], before) and c.lengths.tolist() == [2, 2, 2]


# ---------------------------------------------------------------------- greedy, batches, sampling
def test_greedy_equals_uncached_argmax_chain():
    model = tiny_model()
    prompt = torch.randint(3, 256, (1, 7))
    out = model.generate(prompt, max_new_tokens=16, ignore_eos=True)
    x = prompt
    with torch.no_grad():
        for _ in range(16):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


def test_batched_equals_each_alone():
    model = tiny_model(seed=1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [30]]
    eos = [97, 45]  # stop ids so that some rows end early and others run to the limit
    batch = model.generate(prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert batch.shape[1] <= 7 + 12
    for i, p in enumerate(prompts):
        alone = model.generate([p], max_new_tokens=12, eos_token_id=eos)[0, len(p):].tolist()
        row = batch[i, 7:].tolist()
        assert row[: len(alone)] == alone
        assert all(t == 0 for t in row[len(alone):])


def test_transformers_style_left_padded_input():
    model = tiny_model()
    ids, am = prepare_inputs(model, [[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and am.tolist() == [[1, 1, 1], [0, 0, 1]]
    out = model.generate(ids, attention_mask=am, max_new_tokens=4, ignore_eos=True)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], ids)


def test_sampling_seed_reproducible():
    model = tiny_model()
    opts = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01,
                repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1, ignore_eos=True)
    a = model.generate([[5, 6, 7], [9]], seed=123, **opts)
    b = model.generate([[5, 6, 7], [9]], seed=123, **opts)
    c = model.generate([[5, 6, 7], [9]], seed=124, **opts)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate([[5, 6, 7]], max_new_tokens=8, ignore_eos=True)
    assert torch.equal(model.generate([[5, 6, 7]], max_new_tokens=8, ignore_eos=True, do_sample=True, top_k=1,
                                      seed=0), greedy)


def test_logits_processing():
    p = SamplingParams(do_sample=True, top_k=2)
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(truncate(x, [p])).tolist() == [[True, False, False, True]]
    # top_p: probs 0.64, 0.24, 0.09, 0.03 -> the smallest prefix reaching 0.8 has two tokens
    y = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(truncate(y, [SamplingParams(do_sample=True, top_p=0.8)])).tolist() == \
        [[False, False, True, True]]
    assert torch.isinf(truncate(y, [SamplingParams(do_sample=True, min_p=0.3)])).tolist() == \
        [[False, False, True, True]]
    st = PenaltyState.create([[0]], 4, "cpu")
    st.update(torch.tensor([1]))
    st.update(torch.tensor([1]))
    out = apply_penalties(torch.tensor([[2.0, -2.0, 1.0, 1.0]]),
                          [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)], st)
    assert out.tolist() == [[1.0, -4.0 - 1.0 - 0.25, 1.0, 1.0]]


# ---------------------------------------------------------------------- beam search
def test_beam_search_one_beam_equals_greedy():
    model = tiny_model()
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, am = prepare_inputs(model, prompts)
    greedy = model.generate(prompts, max_new_tokens=10, eos_token_id=[40, 41])
    with torch.no_grad():
        states = beam_search(model, ids, am, SamplingParams(max_new_tokens=10, eos_token_id=(40, 41)), 1)
    for i, s in enumerate(states):
        assert greedy[i, 4:4 + len(s.tokens)].tolist() == s.tokens


def test_beam_search_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for eos, k, lp, early in [(50, 3, 1.0, False), (113, 4, 2.0, False), (105, 2, 0.0, True), (8, 3, -1.0, False)]:
        kw = dict(max_new_tokens=10, num_beams=k, length_penalty=lp, early_stopping=early, eos_token_id=eos,
                  pad_token_id=0)
        a = hf.generate(x, do_sample=False, **kw)[0, 6:].tolist()
        b = model.generate(x, **kw)[0, 6:].tolist()
        strip = lambda s: s[: len(s) - len(s) + next((i for i in range(len(s), 0, -1) if s[i - 1] != 0), 0)]
        assert strip(a) == strip(b), (eos, k, lp, early)


# ---------------------------------------------------------------------- text: stops and streaming
def test_detokenizer_never_splits_utf8():
    tok = ByteTok()
    ids = tok.encode(MULTIBYTE)
    for t in (tok, WindowTok()):
        d = Detokenizer(t)
        pieces = [d.push(i) for i in ids] + [d.flush()]
        assert "".join(pieces) == MULTIBYTE
        assert all("\ufffd" not in p for p in pieces)
    # one byte per "token": every multi-byte character arrives in pieces
    raw = MULTIBYTE.encode()
    byte_ids = [next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == bytes([b])) for b in raw]
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in byte_ids]
    assert "".join(pieces) == MULTIBYTE and all("\ufffd" not in p for p in pieces)


def test_stop_string_filter_holds_back_prefixes():
    f = StopStringFilter(["END", "xyz"])
    out = [f.push(p) for p in ["abc E", "N", "D tail"]]
    assert out == [("abc ", False), ("", False), ("", True)]
    f = StopStringFilter(["END"])
    assert [f.push(p) for p in ["aE", "Nb"]] == [("a", False), ("ENb", False)]


@pytest.mark.parametrize("tok_cls", [ByteTok, WindowTok])
def test_stream_equals_text_and_stop_strings_cut(tok_cls):
    tok = tok_cls()
    model = tiny_model(vocab_size=tok.vocab_size, seed=5)
    opts = dict(max_new_tokens=40, do_sample=True, seed=11, temperature=1.3)
    pieces = list(stream(model, tok, "héllo wörld", **opts))
    text = generate_text(model, tok, "héllo wörld", **opts)
    out = generate(model, [tok.encode("héllo wörld")], tokenizer=tok, return_dict=True, **opts)
    assert "".join(pieces) == text == out.texts[0] == tok.decode(out.new_tokens[0])
    assert len(pieces) > 1
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop and stop.strip()
    cut = generate_text(model, tok, "héllo wörld", stop=[stop], **opts)
    assert cut == text[: text.index(stop)]
    assert "".join(stream(model, tok, "héllo wörld", stop=[stop], **opts)) == cut


# ---------------------------------------------------------------------- errors
def test_bad_input_raises_generation_error():
    model = tiny_model()
    for args, kw in [([[]], {}), ([], {}), ([[5]], {"temperature": -1}), ([[5]], {"top_p": 0.0}),
                     ([[5]], {"bogus_option": 1}), ([[5] * 300], {}), ([[5] * 200], {"max_new_tokens": 100}),
                     ([[5]], {"stop": ["x"]}), ([[999]], {}), ([[5]], {"num_beams": 0}),
                     ([[5]], {"num_beams": 2, "do_sample": True}), ([[5]], {"cache_mode": "paged"})]:
        with pytest.raises(GenerationError):
            model.generate(args, **kw)
