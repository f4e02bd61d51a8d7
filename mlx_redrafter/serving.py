"""The server's generation layer: requests decoded in arrival order on one thread, several at once.

Requests wait in a bounded FIFO queue; one more than it holds is refused at once (`submit` returns
False: the HTTP layer answers 503). The worker takes the oldest request together with the ones
right behind it that can share its batch (the same sampling settings, no seed, no long prefix in
the prompt cache) up to `max_batch`, and decodes them as rows of one speculative batch
(`Decoder.run`: each row drafts and verifies its own tree); a request alone, or one that reuses a
cached conversation, goes through `stream_generate` with the prompt cache. The worker thread owns
every MLX call and the prompt cache. A request whose client went away is cancelled: the worker
checks between tokens (and skips it if it is still queued), so its row stops within one step.
Events go back to the HTTP layer's event loop as they happen.
"""

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from .beam_search import BeamShape
from .generate import (Responses, cache_kind, chosen_shape, context_window, decoder_for, fit_context,
                       stream_generate)
from .openai_api import Completion, usage
from .prompt_cache import PromptCache
from .stopping import StopText

REUSE_ALONE = 64  # a request sharing this many tokens with a cached conversation is decoded alone, reusing it

log = logging.getLogger("mlx_redrafter.serve")


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    finish_reason: str
    usage: dict
    speculative: dict


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    """One request: `send` delivers Delta* then Done (or Failed) to whoever waits for them."""

    request: Completion
    send: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    answered: bool = False  # its Done or Failed was sent

    def cancel(self):
        self.cancelled.set()


class Worker:
    def __init__(self, model, tokenizer, queue_size: int = 16, prompt_cache_size: int = 4, drafter="auto",
                 max_batch: int = 4):
        if not (isinstance(drafter, str) and drafter == "auto"):  # "auto" is read per request; a folder loaded once, here
            from .drafter import drafter_from

            drafter = drafter_from(model, drafter)
        self.model, self.tokenizer, self.drafter, self.max_batch = model, tokenizer, drafter, max_batch
        self.prompt_cache = PromptCache(prompt_cache_size)
        self.capacity = queue_size + max_batch  # waiting plus those decoding
        self._waiting: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self.admitted = self.active = 0
        self.served = 0
        self.cancelled = 0  # requests stopped because their client went away
        self.batched = 0  # requests decoded as a row of a batch of several
        threading.Thread(target=self._serve, name="mlx-redrafter-worker", daemon=True).start()

    def submit(self, job: Job) -> bool:
        """Queue a request; False when the queue is full."""
        with self._ready:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            self._waiting.append(job)
            self._ready.notify()
        return True

    def status(self) -> dict:
        with self._lock:
            return {"active": self.active, "queued": self.admitted - self.active,
                    "queue_size": self.capacity - self.max_batch, "max_batch": self.max_batch,
                    "served": self.served, "cancelled": self.cancelled, "batched": self.batched}

    def _serve(self):
        while True:
            jobs = []
            try:
                jobs, shape = self._take()
                self._decode(jobs, shape)
            except Exception as e:  # a failed batch must not stop the server; answered jobs keep their Done
                log.exception("generation failed")
                for job in jobs:
                    self._finish(job, _failed(e))
            finally:
                with self._lock:
                    self.admitted -= len(jobs)
                    self.active = 0
                    self.served += len(jobs)

    def _take(self) -> Tuple[List[Job], Optional[BeamShape]]:
        """The oldest request and those right behind it that can share its batch, and the batch's
        speculative settings (None: the request is decoded alone)."""
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            jobs = [self._waiting.popleft()]
            shape = self._batch_shape(jobs[0].request.sampling) if self._batchable(jobs[0]) else None
            while (shape is not None and self._waiting and len(jobs) < self.max_batch
                   and self._batchable(self._waiting[0], jobs[0].request.sampling)):
                jobs.append(self._waiting.popleft())
            self.active = len(jobs)
            return jobs, shape

    def _batchable(self, job: Job, sampling=None) -> bool:
        req = job.request
        return (req.sampling.seed is None and (sampling is None or req.sampling == sampling)
                and self.prompt_cache.shared(req.ids, cache_kind(self.model, True)) < REUSE_ALONE)

    def _drafter(self):
        return getattr(self.model, "drafter", None) if self.drafter == "auto" else self.drafter

    def _batch_shape(self, sampling):
        """The speculative settings a batch would use (None: no drafter, or plain decoding is faster)."""
        drafter = self._drafter()
        return None if drafter is None else chosen_shape(self.model, drafter, sampling)

    def _finish(self, job: Job, event):
        """Send a job its one final event (Done or Failed), as soon as it is known."""
        if job.answered:
            return
        job.answered = True
        if isinstance(event, Done) and event.finish_reason == "cancelled":
            with self._lock:
                self.cancelled += 1
        job.send(event)

    def _decode(self, jobs: List[Job], shape: Optional[BeamShape]):
        """Decode the jobs (a batch, or one alone); a job cancelled while queued is not decoded."""
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                self._finish(job, _done(job.request, "cancelled", None, 0))
            else:
                live.append(job)
        if len(live) > 1:
            self._generate_batch(live, self._drafter(), shape)
        elif live:
            self._finish(live[0], self._generate(live[0]))

    def _generate(self, job: Job) -> "Done":
        req = job.request
        answer = Answer(job)
        responses = stream_generate(self.model, self.tokenizer, req.ids, drafter=self.drafter,
                                    max_tokens=req.max_tokens, sampling=req.sampling,
                                    prompt_cache=self.prompt_cache)
        try:
            for response in responses:
                if answer.feed(response):
                    break
        finally:
            responses.close()  # the prompt cache keeps what was decoded
        return answer.done()

    def _generate_batch(self, jobs: List[Job], drafter, shape):
        """The jobs as rows of one speculative batch; each row's Done goes out when that row ends.
        A failure in one row's text is that row's alone."""
        sampling = jobs[0].request.sampling
        fitted = [fit_context(job.request.ids, job.request.max_tokens, context_window(self.model)) for job in jobs]
        answers = [Answer(job) for job in jobs]
        rows = [Responses(self.tokenizer, len(ids), limit, speculative=True) for ids, limit in fitted]
        steps = decoder_for(self.model, drafter, shape, sampling).run([ids for ids, _ in fitted])
        with self._lock:
            self.batched += len(jobs)
        running = set(range(len(jobs)))
        try:
            while running:
                tokens, counts = next(steps)
                for row in sorted(running):
                    try:
                        finished = any(answers[row].feed(r) for r in rows[row].step(tokens[row], counts[row]))
                        event = answers[row].done() if finished else None
                    except Exception as e:
                        log.exception("generation failed in one row")
                        event = _failed(e)
                    if event is not None:
                        running.discard(row)
                        self._finish(jobs[row], event)
        finally:
            steps.close()


class Answer:
    """One request's text as it is decoded: stop strings, events to its client, the finish reason."""

    def __init__(self, job: Job):
        self.job, self.stops = job, StopText(job.request.stop)
        self.last, self.drafted, self.finish = None, 0, None

    def feed(self, response) -> bool:
        """Pass one token's response on; True once the answer is finished (or its client left)."""
        self.last = response
        self.drafted += response.from_draft
        text = self.stops.feed(response.text)
        if response.finish_reason:
            text += self.stops.flush()
        if text:
            self.job.send(Delta(text))
        if self.stops.stopped or response.finish_reason:
            self.finish = "stop" if self.stops.stopped else response.finish_reason
        elif self.job.cancelled.is_set():
            log.info("client went away: generation stopped")
            self.finish = "cancelled"
        return self.finish is not None

    def done(self) -> "Done":
        return _done(self.job.request, self.finish or "length", self.last, self.drafted)


def _failed(e: Exception) -> Failed:
    return Failed(f"generation failed: {type(e).__name__}: {str(e)[:200]}")


def _done(req: Completion, finish: str, last, drafted: int) -> Done:
    n = last.generation_tokens if last else 0
    steps = last.steps if last else 0
    spec = {"decoder": "redrafter" if last is not None and last.speculative else "plain", "steps": steps,
            "accepted_tokens": drafted, "tokens_per_step": round(n / steps, 3) if steps else 0.0,
            "generation_tps": round(last.generation_tps, 2) if last else 0.0,
            "prompt_tps": round(last.prompt_tps, 2) if last else 0.0}
    return Done(finish, usage(len(req.ids), n, last.cached_tokens if last else 0), spec)
