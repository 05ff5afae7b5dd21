"""The decode worker: one thread drives the continuous-batching engine for all HTTP requests.

    backend = Backend(model, tokenizer, max_batch_size=16, max_queue=256).start()
    sub = backend.submit([Sequence(ids, params)], loop)   # from the event loop; QueueFull -> 429
    async for item in sub: ...                              # ("prompt"|"token"|"error", choice, payload)
    backend.close()                                         # finishes in-flight work, then stops

Every HTTP request becomes one or more sequences (prompts x n). The worker thread owns the model: it
adds the sequences to `seekformer.inference.engine.Engine` and calls `engine.step()` while anything runs,
so sequences of concurrent requests share each decode step (they are batched, not serialised; long
prompts are prefilled in chunks between steps). Prompts to score (echo + logprobs) and inputs to embed
are `PromptWork`: one bounded round of it (about `prefill_chunk` tokens, requests taking turns) runs
before each engine step, so neither blocks the streams that are decoding. Events travel back to the
request's asyncio queue with `loop.call_soon_threadsafe`.

Isolation: a failure while serving one sequence (its sampling setup, stop strings, scoring) ends that
sequence with an ("error", ...) item; the other requests go on. Only an unexpected failure of the engine
itself (a bug) ends every sequence in flight.

Admission: at most `max_batch_size` sequences decode at once and at most `max_queue` more wait; a
request that would exceed that is refused (QueueFull, HTTP 429) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..inference.sampling import SamplingParams
from .prompt_work import PromptJob, PromptWork

log = logging.getLogger("seekformer.serving")
TRIM_EVERY_TOKENS = 65536  # prompt tokens of scoring/embedding work after which freed memory goes back to the OS
_trim_lock = threading.Lock()
_last_trim = [0.0]


def release_memory(min_interval: float = 1.0) -> bool:
    """Give freed heap memory back to the OS (glibc malloc_trim), at most once per `min_interval` seconds;
    False where there is no glibc. Big requests leave large free blocks that glibc would otherwise keep."""
    with _trim_lock:
        now = time.monotonic()
        if now - _last_trim[0] < min_interval:
            return False
        _last_trim[0] = now
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    """Runs on the event loop: hand each item to its request's queue."""
    for queue, item in items:
        queue.put_nowait(item)


def _log_failure(error: Exception | None) -> None:
    """One line for an unexpected failure of one sequence (user mistakes are 4xx answers, not logged)."""
    from ..errors import SeekformerError

    if not isinstance(error, (SeekformerError, ShuttingDown)):
        log.error("a sequence failed (the others go on): %s: %s", type(error).__name__, error,
                  exc_info=error if log.isEnabledFor(logging.DEBUG) else None)


class QueueFull(Exception):
    """No room for more sequences (answered with HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (HTTP 503)."""


@dataclass
class Sequence:
    """One sequence to generate: prompt ids, sampling params, and `prompt_logprobs` (None: none; k >= 0:
    score the prompt tokens and return the top-k alternatives at each position, for echo). With `embed`
    ("mean" | "last") the prompt is embedded instead (pooled final hidden states; nothing is generated)."""

    prompt_ids: list[int]
    params: SamplingParams | None = None
    prompt_logprobs: int | None = None
    embed: str | None = None


class Submission:
    """The sequences of one HTTP request and the queue their events arrive on (async iterator).

    Items are (kind, choice, payload): ("prompt", i, TokenScores), ("token", i, engine TokenEvent; the
    last one of a sequence has `finish_reason` set), ("embedding", i, tensor [D]; ends the sequence) or
    ("error", i, exception). Iteration ends once every sequence has finished or failed.
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
                if kind in ("error", "embedding") or (kind == "token" and payload.finish_reason is not None):
                    self._open -= 1
            yield items

    def cancel(self) -> None:
        """Stop generating for this request (client gone); safe to call more than once."""
        if not self.cancelled and self._open > 0:
            self.cancelled = True
            self.backend._cancel(self)


class Backend:
    """Owns the model, the engine and the worker thread (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 256,
                 prefill_chunk: int = 512, speculative: bool | None = None,
                 speculative_tokens: int | None = None) -> None:
        """`speculative` as `Engine` takes it: True = every request speculates unless it says
        otherwise, None = requests that ask (a model with MTP modules), False = never;
        `speculative_tokens`: drafts per step (None: the MTP depth)."""
        from ..inference.engine import Engine

        self.speculative, self.speculative_tokens = speculative, speculative_tokens
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.prefill_chunk = int(prefill_chunk)
        self._engine_cls = Engine
        self.engine = self._new_engine()
        self.work = PromptWork(model, self.prefill_chunk)
        self._trimmed_at = 0
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
        """Sequences the server holds at once: decoding rows plus the waiting queue."""
        return self.max_batch_size + self.max_queue

    @property
    def outstanding(self) -> int:
        """Sequences submitted and not yet finished (running or waiting)."""
        return self._outstanding

    @property
    def running(self) -> int:
        """Sequences in the decode batch now."""
        return self.engine.num_running

    @property
    def waiting(self) -> int:
        """Sequences submitted but not yet decoding (queued or being prefilled)."""
        return max(0, self._outstanding - self.engine.num_running)

    @property
    def alive(self) -> bool:
        """Whether the decode thread runs (False before `start()` and after it failed or stopped)."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Backend:
        """Start the decode thread (a daemon); returns self."""
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

    @property
    def speculative_available(self) -> bool:
        """Whether requests may ask for speculative decoding (the engine keeps an MTP drafter)."""
        return self.engine.batch.drafter is not None

    def _new_engine(self):
        return self._engine_cls(self.model, self.tokenizer, max_batch_size=self.max_batch_size,
                                prefill_chunk=self.prefill_chunk, speculative=self.speculative,
                                num_speculative_tokens=self.speculative_tokens)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self.engine.has_work() and not self.work and not self._closing:
                    self._cond.wait()
                if self._closing and not self._inbox and not self.engine.has_work() and not self.work:
                    return
                new, self._inbox = self._inbox, []
            self._admit(new)
            if self.work:
                self._prompt_round()
            try:
                if self.engine.has_work():
                    events = self.engine.step()
                    self.peak_running = max(self.peak_running, self.engine.num_running)
                    self._dispatch(events)
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server: fail the requests in flight
                log.exception("the decode engine failed; ending the %d sequences in flight", len(self._routes))
                self._fail_all(e)

    def _fail(self, sub: Submission, i: int, error: Exception) -> None:
        _log_failure(error)
        sub.push(("error", i, error))
        self._finish()

    def _admit(self, new: list[tuple[Submission, int]]) -> None:
        """Sequences to score or embed join the prompt work; the others join the engine."""
        for sub, i in new:
            seq = sub.sequences[i]
            if sub.cancelled:
                self._fail(sub, i, ShuttingDown("cancelled"))
            elif seq.embed is not None:
                self.work.add(PromptJob(sub, i, seq.prompt_ids, "embed", pooling=seq.embed))
            elif seq.prompt_logprobs is not None:
                self.work.add(PromptJob(sub, i, seq.prompt_ids, "score", top_n=seq.prompt_logprobs))
            else:
                self._add_to_engine(sub, i)

    def _add_to_engine(self, sub: Submission, i: int) -> None:
        seq = sub.sequences[i]
        try:
            rid = self.engine.add_request(seq.prompt_ids, seq.params)
        except Exception as e:  # noqa: BLE001 - a bad sequence ends alone (GenerationError: a 400)
            self._fail(sub, i, e)
            return
        sub.engine_ids[i] = rid
        self._routes[rid] = (sub, i)
        if sub.cancelled:
            self.engine.cancel(rid)

    def _prompt_round(self) -> None:
        """One round of scoring / embedding (see PromptWork); scored sequences then go on to generate."""
        for job in self.work.drop_cancelled():
            self._fail(job.sub, job.choice, ShuttingDown("cancelled"))
        try:
            results = self.work.run_round()
        except Exception as e:  # noqa: BLE001 - a bug in the prompt work: end the jobs it held
            log.exception("prompt scoring failed")
            results = []
            for key in list(self.work._queues):
                results += [(job, e) for job in self.work._queues.pop(key)]
        for job, result in results:
            if isinstance(result, Exception):
                self._fail(job.sub, job.choice, result)
            elif job.kind == "embed":
                job.sub.push(("embedding", job.choice, result))
                self._finish()
            else:
                job.sub.push(("prompt", job.choice, result))
                self._add_to_engine(job.sub, job.choice)
        if self.work.tokens_done - self._trimmed_at >= TRIM_EVERY_TOKENS and not self.work:
            self._trimmed_at = self.work.tokens_done
            release_memory()

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
            item = ("token", i, ev)
            if ev.finish_reason == "error":
                _log_failure(ev.error)
                item = ("error", i, ev.error)
            batches.setdefault(sub.loop, []).append((sub.queue, item))
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
        self.engine = self._new_engine()
