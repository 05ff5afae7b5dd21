"""Inference: latent KV cache decoding, sampling, beam search, MTP speculative decoding, batched engine.

    model.generate(ids, max_new_tokens=64, do_sample=True, top_p=0.9, seed=0)   # transformers-style ids
    generate_text(model, tok, "Once upon", stop=["\\n\\n"])                    # text, stop strings cut
    for piece in stream(model, tok, "Once upon"): ...                           # UTF-8-safe text pieces
    Engine(model, tok).add_request(ids, SamplingParams(...)); engine.step()     # continuous batching
    loglikelihood(model, [(context_ids, continuation_ids), ...])               # [(sum logprob, is greedy)]
    score_tokens(model, [ids, ...], top_n=5)                                    # per-token logprobs
"""

from .chat import ChatSession
from .engine import Completion, Engine, Request, TokenEvent
from .generate import GenerateOutput, generate, generate_text, stream
from .sampling import SamplingParams
from .scoring import TokenScores, loglikelihood, next_token_logprobs, score_tokens

__all__ = ["ChatSession", "Completion", "Engine", "GenerateOutput", "Request", "SamplingParams", "TokenEvent",
           "TokenScores", "generate", "generate_text", "loglikelihood", "next_token_logprobs", "score_tokens",
           "stream"]
