"""`mlx-redrafter chat`: an interactive terminal chat, speculative, with prompt-cache reuse between turns.

Each answer streams as it is decoded. /reset forgets the conversation, /exit (or Ctrl-D) quits,
Ctrl-C stops the current answer and keeps what was said (at the prompt it clears the line).
Ctrl-C only raises a flag, read between tokens, so an answer is never cut inside an MLX call and the
cached conversation stays consistent for the next turn.
"""

import signal
import sys
from contextlib import contextmanager
from typing import List, Optional

from .generate import stream_generate
from .prompt_cache import PromptCache

HELP = "/reset forgets the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


class Chat:
    def __init__(self, model, tokenizer, max_tokens: int, sampling, verbose: bool = False,
                 system: Optional[str] = None, out=sys.stdout):
        self.model, self.tokenizer, self.max_tokens, self.sampling = model, tokenizer, max_tokens, sampling
        self.verbose, self.system, self.out = verbose, system, out
        self.cache = PromptCache()
        self.history: List[dict] = []
        self.reset()

    def reset(self):
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def run(self, read=input):
        self.say(f"[{HELP}]")
        while True:
            try:
                line = read(">> ")
            except EOFError:  # Ctrl-D
                self.say("")
                return
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as a shell does
                self.say("")
                continue
            command = line.strip()
            if command == "/exit":
                return
            if command == "/reset":
                self.reset()
                self.say("[conversation reset]")
            elif command.startswith("/"):
                self.say(f"[unknown command {command.split()[0]}: {HELP}]")
            elif command:
                try:
                    self.answer(line)
                except KeyboardInterrupt:  # Ctrl-C before the answer's own handler was in place
                    self.say("\n[stopped]")

    def answer(self, text: str):
        messages = self.history + [{"role": "user", "content": text}]
        reply, last = [], None
        try:
            with _sigint_flag() as stop:
                responses = stream_generate(self.model, self.tokenizer, messages, max_tokens=self.max_tokens,
                                            sampling=self.sampling, prompt_cache=self.cache)
                for last in responses:
                    reply.append(last.text)
                    self.out.write(last.text)
                    self.out.flush()
                    if stop.is_set():
                        break
                responses.close()
        except ValueError as e:  # the conversation no longer fits the context window
            self.say(f"\n[error: {str(e).splitlines()[0]} -- /reset starts a new conversation]")
            return
        stopped = last is not None and last.finish_reason is None
        self.say("\n[stopped]" if stopped else "")
        self.history = messages + [{"role": "assistant", "content": "".join(reply)}]
        if self.verbose and last is not None:
            self.say(_stats(last))

    def say(self, text: str):
        print(text, file=self.out, flush=True)


def _stats(r) -> str:
    per_step = f", {r.generation_tokens / max(r.steps, 1):.2f} tokens per step" if r.speculative else " (plain decoding)"
    return (f"[{r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s{per_step}; prompt {r.prompt_tokens} "
            f"tokens, {r.cached_tokens} from the cache, {r.prompt_tps:.1f} tokens/s]")


class _Flag:
    def __init__(self):
        self.value = False

    def set(self, *_):
        self.value = True

    def is_set(self) -> bool:
        return self.value


@contextmanager
def _sigint_flag():
    """Ctrl-C sets a flag instead of raising, for the duration of one answer."""
    flag = _Flag()
    previous = signal.signal(signal.SIGINT, flag.set)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
