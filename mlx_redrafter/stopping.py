"""Stop strings matched across token boundaries: text that may be the start of a stop string is held
back until the next tokens show whether it is, so no part of a stop string ever reaches the client.

    stops = StopText(["\\n\\n", "END"])
    stops.feed("Hello EN")   # -> "Hello "   ("EN" may begin "END": held back)
    stops.feed("D more")     # -> ""         (stops.stopped is True; nothing after the match is sent)
    stops.flush()            # at the end of generation without a match: whatever was held back
"""

from typing import List


class StopText:
    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of the text so far that can be sent now."""
        if self.stopped:
            return ""
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = self._partial(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.stopped else held

    def _partial(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        for n in range(min(len(text), max((len(s) - 1 for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0
