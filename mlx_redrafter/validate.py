"""Range checks shared by the config readers: one-line errors naming the field.

Bounds are generous enough for any real Llama-family model up to a few
hundred billion parameters (Llama 3.1 405B: hidden 16384, 126 layers,
128 heads, intermediate 53248, vocabulary 128256) and tight enough that a
crafted config cannot make the loader build millions of layers or allocate
terabytes before its weights are even read.
"""

import math
from typing import Any

MAX_HIDDEN = 1 << 16            # hidden_size, exit_dim, head_dim * heads
MAX_LAYERS = 1024               # num_hidden_layers
MAX_HEADS = 1024                # num_attention_heads, num_key_value_heads
MAX_HEAD_DIM = 1024
MAX_INTERMEDIATE = 1 << 20      # feed-forward width
MAX_VOCAB = 1 << 22             # 4,194,304 tokens (largest real vocabularies: ~262k)
MAX_POSITIONS = 1 << 24         # context length (16M tokens)
MAX_DRAFT_LAYERS = 64


def integer(where: str, name: str, value: Any, low: int, high: int) -> int:
    """value as an int in [low, high], else a one-line ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name} must be an integer from {low} to {high}, got {_show(value)}")
    if not low <= value <= high:
        raise ValueError(f"{where}: {name} = {value} is out of range (expected {low} to {high})")
    return value


def optional_integer(where: str, name: str, value: Any, low: int, high: int):
    return None if value is None else integer(where, name, value, low, high)


def number(where: str, name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {_show(value)}")
    if value < low or value > high or (low_open and value == low):
        bound = f"more than {low}" if low_open else f"at least {low}"
        raise ValueError(f"{where}: {name} = {value} is out of range (expected {bound} and at most {high})")
    return value


def boolean(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be true or false, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
