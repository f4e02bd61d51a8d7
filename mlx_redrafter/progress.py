"""Progress bars: a widget in Jupyter, a text bar in a terminal (`tqdm.auto`).

Bars redraw at most twice a second, so a loop of many fast steps neither floods
a notebook cell nor slows the loop; inner bars (one per setting or batch) pass
leave=False and vanish when done.
"""

from tqdm.auto import tqdm

MININTERVAL = 0.5  # seconds between redraws


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A `tqdm.auto` bar over `iterable` (or with total=...); enabled=False draws nothing."""
    return tqdm(iterable, disable=not enabled, mininterval=MININTERVAL, **kwargs)


def close_bars():
    """Close every live bar, each ending its line, so that a message after it starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
