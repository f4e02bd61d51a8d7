"""Progress bars: a widget in Jupyter, a text bar in a terminal (`tqdm.auto`).

Bars redraw at most twice a second, so a loop of many fast steps neither floods
a notebook cell nor slows the loop; inner bars (one per setting or batch) pass
leave=False and vanish when done.
"""

import weakref

from tqdm.auto import tqdm

MININTERVAL = 0.5  # seconds between redraws
_BARS = weakref.WeakSet()  # this package's bars (tqdm's own list holds every library's)


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A `tqdm.auto` bar over `iterable` (or with total=...); enabled=False draws nothing."""
    bar = tqdm(iterable, disable=not enabled, mininterval=MININTERVAL, **kwargs)
    _BARS.add(bar)
    return bar


def close_bars():
    """Close this package's live bars, each ending its line, so that a message after them starts a line of
    its own. Innermost first: an outer bar closed first would leave the cursor on an inner bar's line."""
    for bar in sorted(list(_BARS), key=lambda b: -abs(getattr(b, "pos", 0) or 0)):
        bar.close()
