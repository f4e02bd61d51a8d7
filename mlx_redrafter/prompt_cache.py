"""Prompt-cache reuse: keep the KV caches of recent conversations and continue the next request from
the longest token prefix it shares with one of them, as mlx-lm's server does.

A chat's second turn is its first turn's prompt, the reply and a new user message: with the
first turn's cache, only the new tokens are run through the model.

    cache = mr.PromptCache()
    chat = [{"role": "user", "content": "Name three rivers."}]
    reply = mr.generate(model, tokenizer, chat, prompt_cache=cache)        # fills it
    chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And lakes?"}]
    mr.generate(model, tokenizer, chat, prompt_cache=cache)                # runs only the new tokens

Each entry is a cache and the tokens whose K/V its first committed slots hold (the prompt and every
step's tokens as they are yielded, `Decoder.run`). An entry is taken out while a request uses it (a
cache is extended in place) and put back as soon as that request starts decoding.
"""

from dataclasses import dataclass, field
from typing import Hashable, Iterator, List, Optional, Tuple


@dataclass(eq=False)
class _Entry:
    kind: Hashable  # which decoder's cache (speculative caches and plain ones differ)
    cache: object
    tokens: List[int] = field(default_factory=list)


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """The KV caches of the last `size` conversations (least recently used dropped first)."""

    def __init__(self, size: int = 1):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"a prompt cache holds at least one conversation, got size {size!r}")
        self.size = size
        self._entries: List[_Entry] = []  # most recently used last

    def __len__(self):
        return len(self._entries)

    def shared(self, ids: List[int], kind: Hashable) -> int:
        """How many of `ids`' first tokens the best cached conversation holds (nothing is taken)."""
        return self._best(ids, kind)[1]

    def _best(self, ids: List[int], kind: Hashable) -> Tuple[Optional[_Entry], int]:
        """The entry of this kind sharing the longest prefix with `ids` (the oldest on a tie), and its length."""
        return max(((e, common_prefix(e.tokens, ids)) for e in self._entries if e.kind == kind),
                   key=lambda pair: pair[1], default=(None, 0))

    def take(self, ids: List[int], kind: Hashable) -> Tuple[Optional[object], int]:
        """(cache, n): the cache sharing the longest prefix with `ids`, cut to its first n tokens and
        removed from the store (None, 0 when nothing is shared). n < len(ids): at least one token
        is left to run, whose hidden state the decoder starts from."""
        best, n = self._best(ids, kind)
        n = min(n, len(ids) - 1)
        if best is None or n < 1:
            return None, 0
        self._entries.remove(best)
        best.cache.truncate(n)
        return best.cache, n

    def record(self, ids: List[int], cache, kind: Hashable, steps: Iterator) -> Iterator:
        """Pass (tokens, accepted) steps through, noting each step's tokens as the cache's own; the
        cache is stored from the start. An exception inside a step may leave the cache half
        updated, so it is dropped then; a consumer that stops between steps keeps it."""
        entry = _Entry(kind, cache, list(ids))
        self._entries = self._entries[max(0, len(self._entries) - self.size + 1):]
        self._entries.append(entry)
        while True:
            try:
                tokens, accepted = next(steps)
            except StopIteration:
                return
            except BaseException:
                self._drop(entry)
                raise
            entry.tokens += tokens
            yield tokens, accepted

    def _drop(self, entry: _Entry):
        if entry in self._entries:
            self._entries.remove(entry)

    def clear(self):
        self._entries = []
