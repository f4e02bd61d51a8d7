"""The server's generation layer: one request decoded at a time, in arrival order, on one thread.

The engine decodes one sequence at a time (batch 1), so requests wait in a bounded FIFO queue;
one more than it holds is refused at once (`submit` returns False: the HTTP layer answers 503). The
worker thread owns every MLX call and the prompt cache. A request whose client went away is
cancelled: the worker checks between tokens (and skips it if it is still queued), so its slot frees
within one decoding step. Events go back to the HTTP layer's event loop as they happen.
"""

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from .generate import stream_generate
from .openai_api import Completion, usage
from .prompt_cache import PromptCache
from .stopping import StopText

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

    def cancel(self):
        self.cancelled.set()


class Worker:
    def __init__(self, model, tokenizer, queue_size: int = 16, prompt_cache_size: int = 4, drafter="auto"):
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        self.prompt_cache = PromptCache(prompt_cache_size)
        self.capacity = queue_size + 1  # waiting plus the one decoding
        self._jobs: "queue.Queue[Job]" = queue.Queue()
        self._lock = threading.Lock()
        self.admitted = 0
        self.served = 0
        self.cancelled = 0  # requests stopped because their client went away
        threading.Thread(target=self._serve, name="mlx-redrafter-worker", daemon=True).start()

    def submit(self, job: Job) -> bool:
        """Queue a request; False when the queue is full."""
        with self._lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
        self._jobs.put(job)
        return True

    def status(self) -> dict:
        with self._lock:
            return {"active": min(self.admitted, 1), "queued": max(self.admitted - 1, 0),
                    "queue_size": self.capacity - 1, "served": self.served, "cancelled": self.cancelled}

    def _serve(self):
        while True:
            job = self._jobs.get()
            try:
                # a request cancelled while queued still gets its Done: a waiting handler must return
                done = _done(job.request, "cancelled", None, 0) if job.cancelled.is_set() else self._generate(job)
                if done.finish_reason == "cancelled":
                    with self._lock:
                        self.cancelled += 1
                job.send(done)
            except Exception as e:  # a failure in one request must not stop the server
                log.exception("generation failed")
                job.send(Failed(f"generation failed: {type(e).__name__}: {str(e)[:200]}"))
            finally:
                with self._lock:
                    self.admitted -= 1
                    self.served += 1

    def _generate(self, job: Job) -> Optional[Done]:
        req = job.request
        stops = StopText(req.stop)
        finish, last, drafted = "length", None, 0
        responses = stream_generate(self.model, self.tokenizer, req.ids, drafter=self.drafter,
                                    max_tokens=req.max_tokens, sampling=req.sampling,
                                    prompt_cache=self.prompt_cache)
        try:
            for last in responses:
                drafted += last.from_draft
                text = stops.feed(last.text)
                if last.finish_reason:
                    text += stops.flush()
                if text:
                    job.send(Delta(text))
                if stops.stopped or last.finish_reason:
                    finish = "stop" if stops.stopped else last.finish_reason
                    break
                if job.cancelled.is_set():
                    log.info("client went away: generation stopped")
                    finish = "cancelled"
                    break
        finally:
            responses.close()  # the prompt cache keeps what was decoded
        return _done(req, finish, last, drafted)


def _done(req: Completion, finish: str, last, drafted: int) -> Done:
    n = last.generation_tokens if last else 0
    steps = last.steps if last else 0
    spec = {"decoder": "redrafter" if last is not None and last.speculative else "plain", "steps": steps,
            "accepted_tokens": drafted, "tokens_per_step": round(n / steps, 3) if steps else 0.0,
            "generation_tps": round(last.generation_tps, 2) if last else 0.0,
            "prompt_tps": round(last.prompt_tps, 2) if last else 0.0}
    return Done(finish, usage(len(req.ids), n, last.cached_tokens if last else 0), spec)
