"""Sampling settings and the per-row token choice shared by plain and speculative decoding.

Both paths call `choose_tokens` on the base model's logits, so the speculative
decoder samples from exactly the distribution the plain decoder samples from.
Filters apply in Hugging Face's order: temperature, then top-k, then top-p.

Temperatures below `MIN_TEMPERATURE` (1e-5) decode greedily, in both decoders
and the API: logits / T is computed in float32, and T under about 1e-37
overflows it to +-inf (at T = 1e-45 the sampled token was noise). Between the
overflow and the floor, sampling already equals argmax except for logits
within ~1e-4 of the top one (the Gumbel noise spans ~40 / T), closer than a
16-bit model's logits resolve, so the floor (vLLM's sampling epsilon) changes
nothing a model can express and leaves a wide margin to the overflow.
"""

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Optional

import mlx.core as mx

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (module docstring)


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen, in both decoders: greedy (temperature 0) or sampled.

    >>> mr.generate(model, tokenizer, "Hi", sampling=mr.SamplingConfig(temperature=0.7, top_p=0.9, seed=0))
    >>> mr.generate(model, tokenizer, "Hi", temp=0.7, top_p=0.9, seed=0)   # the same, mlx-lm's names
    """

    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: Optional[int] = None

    def __post_init__(self):
        for name, value in (("temperature", self.temperature), ("top-p", self.top_p)):
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral):
            raise ValueError(f"top-k must be an integer, got {self.top_k!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or below MIN_TEMPERATURE (too small to sample with)."""
        return self.temperature < MIN_TEMPERATURE


def filtered_logits(logits: mx.array, cfg: SamplingConfig) -> mx.array:
    """Tempered logits (..., V) with tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(mx.float32) / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = mx.topk(logits, cfg.top_k, axis=-1).min(axis=-1, keepdims=True)
        logits = mx.where(logits < kth, -mx.inf, logits)
    if cfg.top_p < 1:
        ordered = -mx.sort(-logits, axis=-1)
        probs = mx.softmax(ordered, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        kept = mx.maximum((before < cfg.top_p).sum(axis=-1, keepdims=True), 1)
        threshold = mx.take_along_axis(ordered, kept - 1, axis=-1)
        logits = mx.where(logits < threshold, -mx.inf, logits)
    return logits


def choose_tokens(logits: mx.array, cfg: SamplingConfig) -> mx.array:
    """One token per row of logits (..., V): argmax if greedy, else a sample."""
    if cfg.greedy:
        return logits.argmax(axis=-1).astype(mx.int32)
    return mx.random.categorical(filtered_logits(logits, cfg), axis=-1).astype(mx.int32)


def target_probs(logits: mx.array, cfg: SamplingConfig) -> mx.array:
    """The distribution `choose_tokens` draws from (one-hot when greedy)."""
    if cfg.greedy:
        return (mx.arange(logits.shape[-1]) == logits.argmax(axis=-1, keepdims=True)).astype(mx.float32)
    return mx.softmax(filtered_logits(logits, cfg), axis=-1)
