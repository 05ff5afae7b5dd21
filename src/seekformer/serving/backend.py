"""The decode worker: one thread drives the continuous-batching engine for all HTTP requests.

    backend = Backend(model, tokenizer, max_batch_size=16, max_queue=256).start()
    sub = backend.submit([Sequence(ids, params)], loop)   # from the event loop; QueueFull -> 429
    async for item in sub: ...                              # ("prompt"|"token"|"error", choice, payload)
    backend.close()                                         # finishes in-flight work, then stops

Every HTTP request becomes one or more sequences (prompts x n). The worker thread owns the model: it
scores prompts when echo logprobs are asked (one batched forward), adds the sequences to
`seekformer.inference.engine.Engine` and calls `engine.step()` while anything runs, so sequences of
concurrent requests share each decode step (they are batched, not serialised). Events travel back to
the request's asyncio queue with `loop.call_soon_threadsafe`.

Admission: at most `max_batch_size` sequences decode at once and at most `max_queue` more wait; a
request that would exceed that is refused (QueueFull, HTTP 429) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..errors import SeekformerError
from ..inference.sampling import SamplingParams


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    """Runs on the event loop: hand each item to its request's queue."""
    for queue, item in items:
        queue.put_nowait(item)


class QueueFull(Exception):
    """No room for more sequences (answered with HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (HTTP 503)."""


@dataclass
class Sequence:
    """One sequence to generate: prompt ids, sampling params, and `prompt_logprobs` (None: none; k >= 0:
    score the prompt tokens and return the top-k alternatives at each position, for echo)."""

    prompt_ids: list[int]
    params: SamplingParams
    prompt_logprobs: int | None = None


class Submission:
    """The sequences of one HTTP request and the queue their events arrive on (async iterator).

    Items are (kind, choice, payload): ("prompt", i, TokenScores), ("token", i, engine TokenEvent; the
    last one of a sequence has `finish_reason` set) or ("error", i, exception). Iteration ends once
    every sequence has finished or failed.
    """

    def __init__(self, backend: Backend, sequences: list[Sequence], loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.sequences = sequences
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine_ids: list[str | None] = [None] * len(sequences)
        self.cancelled = False
        self._open = len(sequences)
        self.start = time.perf_counter()
        self.first_token_seconds: float | None = None  # time from submission to the first generated token

    def push(self, item: tuple) -> None:
        """Called by the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def __aiter__(self) -> AsyncIterator[tuple]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple]:
        async for items in self.batches():
            for item in items:
                yield item

    async def batches(self) -> AsyncIterator[list[tuple]]:
        """Like iterating, but yields every item already queued at once (a stream that lags behind the
        decoder sends the tokens that piled up in one chunk instead of one chunk per token)."""
        while self._open > 0:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            for kind, _, payload in items:
                if kind == "token" and self.first_token_seconds is None:
                    self.first_token_seconds = time.perf_counter() - self.start
                    if self.backend.on_first_token is not None:
                        self.backend.on_first_token(self.first_token_seconds)
                if kind == "error" or (kind == "token" and payload.finish_reason is not None):
                    self._open -= 1
            yield items

    def cancel(self) -> None:
        """Stop generating for this request (client gone); safe to call more than once."""
        if not self.cancelled and self._open > 0:
            self.cancelled = True
            self.backend._cancel(self)


class Backend:
    """Owns the model, the engine and the worker thread (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 256) -> None:
        from ..inference.engine import Engine

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self._engine_cls = Engine
        self.engine = Engine(model, tokenizer, max_batch_size=self.max_batch_size)
        self._cond = threading.Condition()
        self._inbox: list[tuple[Submission, int]] = []
        self._routes: dict[str, tuple[Submission, int]] = {}
        self._outstanding = 0  # sequences accepted and not yet finished
        self._closing = False
        self._thread: threading.Thread | None = None
        self.on_tokens = None  # optional callable(n_generated) for metrics
        self.on_first_token = None  # optional callable(seconds) for metrics
        self.peak_running = 0  # most sequences decoded in one step so far

    # ------------------------------------------------------------------ state
    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def running(self) -> int:
        return self.engine.num_running

    @property
    def waiting(self) -> int:
        return max(0, self._outstanding - self.engine.num_running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Backend:
        self._thread = threading.Thread(target=self._run, name="seekformer-decode", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, let accepted sequences finish, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests (event loop side)
    def submit(self, sequences: list[Sequence], loop: asyncio.AbstractEventLoop | None = None) -> Submission:
        """Accept the sequences of one request, or raise QueueFull / ShuttingDown."""
        sub = Submission(self, sequences, loop or asyncio.get_running_loop())
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if self._outstanding + len(sequences) > self.capacity:
                raise QueueFull(f"the server is at capacity ({self._outstanding} sequences in flight, "
                                f"limit {self.capacity}); retry later")
            self._outstanding += len(sequences)
            self._inbox.extend((sub, i) for i in range(len(sequences)))
            self._cond.notify_all()
        return sub

    def _cancel(self, sub: Submission) -> None:
        for rid in sub.engine_ids:
            if rid is not None:
                self.engine.cancel(rid)
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ worker thread
    def _finish(self, n: int = 1) -> None:
        with self._cond:
            self._outstanding -= n

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self.engine.has_work() and not self._closing:
                    self._cond.wait()
                if self._closing and not self._inbox and not self.engine.has_work():
                    return
                new, self._inbox = self._inbox, []
            try:
                self._admit(new)
                if self.engine.has_work():
                    events = self.engine.step()
                    self.peak_running = max(self.peak_running, self.engine.num_running)
                    self._dispatch(events)
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server: fail the requests in flight
                traceback.print_exc()
                self._fail_all(e)

    def _admit(self, new: list[tuple[Submission, int]]) -> None:
        from ..inference.scoring import score_tokens

        live = []
        for sub, i in new:
            if sub.cancelled:
                sub.push(("error", i, ShuttingDown("cancelled")))
                self._finish()
            else:
                live.append((sub, i))
        scored = [(sub, i) for sub, i in live if sub.sequences[i].prompt_logprobs is not None]
        if scored:
            top = max(1, max(sub.sequences[i].prompt_logprobs for sub, i in scored))
            scores = score_tokens(self.model, [sub.sequences[i].prompt_ids for sub, i in scored], top_n=top)
            for (sub, i), s in zip(scored, scores):
                sub.push(("prompt", i, s))
        for sub, i in live:
            seq = sub.sequences[i]
            try:
                rid = self.engine.add_request(seq.prompt_ids, seq.params)
            except SeekformerError as e:
                sub.push(("error", i, e))
                self._finish()
                continue
            sub.engine_ids[i] = rid
            self._routes[rid] = (sub, i)
            if sub.cancelled:
                self.engine.cancel(rid)

    def _dispatch(self, events) -> None:
        """Route a step's events to their requests: one event-loop wake-up per step, not per token."""
        generated = 0
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple]]] = {}
        for ev in events:
            route = self._routes.get(ev.request_id)
            if route is None:
                continue
            sub, i = route
            if ev.token_id is not None:
                generated += 1
            batches.setdefault(sub.loop, []).append((sub.queue, ("token", i, ev)))
            if ev.finish_reason is not None:
                del self._routes[ev.request_id]
                self._finish()
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass
        if generated and self.on_tokens is not None:
            self.on_tokens(generated)

    def _fail_all(self, error: Exception) -> None:
        """An unexpected failure inside the engine: end every sequence in flight and start a fresh engine."""
        for sub, i in self._routes.values():
            sub.push(("error", i, error))
        self._finish(len(self._routes))
        self._routes.clear()
        self.engine = self._engine_cls(self.model, self.tokenizer, max_batch_size=self.max_batch_size)
