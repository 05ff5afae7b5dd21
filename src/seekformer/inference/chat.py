"""A chat session: history, the tokenizer's chat template, streamed replies, context trimming.

    session = ChatSession(model, tokenizer, system="You are terse.", max_new_tokens=128, temperature=0.7)
    for piece in session.send("Hello!"):
        print(piece, end="")
    session.reset()

Prompts are rendered with the tokenizer's chat template (tokenizer_config.json). A reply ends at an
end-of-turn token of that template (`<|end_of_turn|>`, DeepSeek's `<｜end▁of▁sentence｜>`) or eos. When the conversation no longer fits the context with room for
`max_new_tokens`, the oldest user/assistant turns are dropped (the system message stays).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import GenerationError
from ..models.loading import load_model_and_tokenizer  # noqa: F401 - its old home
from .generate import stream


class ChatSession:
    """Multi-turn chat over `stream()`; `options` are generation options (SamplingParams fields)."""

    def __init__(self, model, tokenizer, system: str | None = None, **options) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.options = dict(options)
        self.options.setdefault("max_new_tokens", 256)
        tokenizer.check_chat_template()
        stops = tuple(self.options.pop("stop_token_ids", ()) or ())
        self.options["stop_token_ids"] = stops + tuple(tokenizer.end_of_turn_token_ids)
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self) -> list[int]:
        """Ids of the conversation (ending with the new user message), trimmed to leave max_new_tokens."""
        ctx = self.model.config.max_position_embeddings
        budget = ctx - self.options["max_new_tokens"]
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0

        def encode(messages: list[dict]) -> list[int]:
            return self.tokenizer.chat_ids(messages, add_generation_prompt=True)

        alone = len(encode(self.messages[:first] + self.messages[-1:]))
        if alone > budget:
            self.messages.pop()
            raise GenerationError(f"the message needs {alone} tokens, more than the {budget} the context ({ctx}) "
                                  f"leaves beside max_new_tokens={self.options['max_new_tokens']}")
        while True:
            ids = encode(self.messages)
            if len(ids) <= budget:
                return ids
            del self.messages[first]  # drop the oldest turn: a user message and the reply to it
            if self.messages[first]["role"] == "assistant":
                del self.messages[first]

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply (recorded in the history when done)."""
        if not text.strip():
            raise GenerationError("empty message")
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        reply = []
        for piece in stream(self.model, self.tokenizer, ids, **self.options):
            reply.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply)})
