"""Ctrl-C that is never lost: SIGINT raises a flag that a decoding loop reads between tokens.

Why a flag and not only Python's KeyboardInterrupt: native code that calls back into Python can drop
the exception the handler raised there (CPython's own PyObject_HasAttr clears any error, for one).
On the 2-core CPU under load about one Ctrl-C in 25 during `generate` arrived (nothing pending) and
yet no KeyboardInterrupt reached the loop, which decoded on; the flag is still set then, and the
loop raises at the next token.
"""

import signal
import threading
from contextlib import contextmanager


class SigintFlag:
    """Set by the SIGINT handler; `raise_now` also raises KeyboardInterrupt at once (stops a prefill)."""

    def __init__(self, raise_now: bool):
        self.value = False
        self.raise_now = raise_now

    def set(self, *_):
        self.value = True
        if self.raise_now:
            raise KeyboardInterrupt

    def is_set(self) -> bool:
        return self.value

    def check(self):
        """Raise KeyboardInterrupt if Ctrl-C was pressed (also when the first raise was swallowed)."""
        if self.value:
            raise KeyboardInterrupt


@contextmanager
def sigint_flag(raise_now: bool = False, keep_ignored: bool = True):
    """SIGINT sets the yielded flag for the duration of the block. keep_ignored: a SIGINT the caller
    ignores (a background job) stays ignored, as Python leaves it; an interactive chat takes it anyway."""
    flag = SigintFlag(raise_now)
    ignored = keep_ignored and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if threading.current_thread() is not threading.main_thread() or ignored:
        yield flag  # only the main thread may set handlers
        return
    previous = signal.signal(signal.SIGINT, flag.set)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)  # None: set from C
