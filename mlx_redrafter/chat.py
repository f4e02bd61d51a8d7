"""`mlx-redrafter chat`: an interactive terminal chat, speculative, with prompt-cache reuse between turns.

Each answer streams as it is decoded. /reset forgets the conversation, /exit (or Ctrl-D) quits,
Ctrl-C stops the current answer and keeps what was said (at the prompt it clears the line).
Ctrl-C only raises a flag, read between tokens, so an answer is never cut inside an MLX call and the
cached conversation stays consistent for the next turn. The prompt polls the same flag: the signal
may be delivered to one of MLX's threads, which would not interrupt a blocking input().
"""

import select
import sys
from typing import List, Optional

from .generate import lone_surrogate, stream_generate
from .interrupts import SigintFlag, sigint_flag
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

    def run(self):
        if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the check below, in any locale
            sys.stdin.reconfigure(errors="surrogateescape")
        self.say(f"[{HELP}]")
        while True:
            with sigint_flag(keep_ignored=False) as interrupted:
                line = _read_line(">> ", interrupted, self.out)
            if line is None:  # Ctrl-D
                self.say("")
                return
            if interrupted.is_set():  # Ctrl-C at the prompt: a fresh line, as a shell does
                self.say("")
                continue
            lone = lone_surrogate(line)
            if lone is not None:  # the terminal or a pipe sent bytes that are not UTF-8
                self.say(f"[that line is not UTF-8 text ({_bad_byte(lone)}): set your terminal to UTF-8 "
                         "and type it again]")
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
                self.answer(line)

    def answer(self, text: str):
        messages = self.history + [{"role": "user", "content": text}]
        reply, last = [], None
        try:
            with sigint_flag(keep_ignored=False) as stop:
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


def _read_line(prompt: str, interrupted: SigintFlag, out) -> "str | None":
    """A line from standard input (None at end of input); returns early, with "", once `interrupted`."""
    out.write(prompt)
    out.flush()
    while not interrupted.is_set():
        if select.select([sys.stdin], [], [], 0.1)[0]:
            line = sys.stdin.readline()
            return None if line == "" else line.rstrip("\n")
    return ""


def _bad_byte(c: str) -> str:
    """Python reads undecodable bytes as lone surrogates (U+DC80..U+DCFF carry bytes 0x80..0xff)."""
    return f"byte 0x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else ascii(c)


def _stats(r) -> str:
    per_step = f", {r.generation_tokens / max(r.steps, 1):.2f} tokens per step" if r.speculative else " (plain decoding)"
    return (f"[{r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s{per_step}; prompt {r.prompt_tokens} "
            f"tokens, {r.cached_tokens} from the cache, {r.prompt_tps:.1f} tokens/s]")
