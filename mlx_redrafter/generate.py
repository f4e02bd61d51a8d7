"""Text generation API, in mlx-lm's shapes: ReDrafter speculation with the model's drafter, or plain decoding.

    import mlx_redrafter as mr
    model, tokenizer = mr.load()               # the default model and its packaged drafter
    print(mr.generate(model, tokenizer, "Name three rivers.", max_tokens=64, verbose=True))
    for r in mr.stream_generate(model, tokenizer, "Hello", max_tokens=32):
        print(r.text, end="")
"""

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Union

import mlx.core as mx

from .sampling import SamplingConfig, choose_tokens

PREFILL_CHUNK = 512


@dataclass
class GenerationResponse:
    """One generated token, as mlx-lm's `GenerationResponse` (plus `steps`, `from_draft`, `step_accepted`).

    >>> for r in mr.stream_generate(model, tokenizer, "Hi", max_tokens=8):
    ...     print(r.text, end="")
    >>> r.generation_tokens / r.steps                   # tokens per base-model pass
    """

    text: str  # the new text segment
    token: int
    from_draft: bool  # accepted from the drafter (False for the base model's own token)
    step_accepted: int  # drafted tokens accepted in the step that produced this token
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    steps: int  # base-model forward passes after the prompt
    peak_memory: float  # GB
    finish_reason: Optional[str] = None  # "stop" | "length" | None
    speculative: bool = False  # decoded with a drafter
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prompt cache (not run again)


def encode_prompt(tokenizer, prompt: Union[str, List[int]], chat_template: bool = True) -> List[int]:
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return encode_messages(tokenizer, list(prompt))  # a chat: [{"role": ..., "content": ...}, ...]
    if not isinstance(prompt, str):
        return list(prompt)
    if chat_template:
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer.encode(prompt))


def chat_text(tokenizer, messages: List[dict]) -> str:
    """The chat as the text the model reads (template applied, not tokenized): what to measure before
    tokenizing a huge one, as a template may drop parts of the messages."""
    if getattr(tokenizer, "has_chat_template", False):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in messages)


def encode_messages(tokenizer, messages: List[dict]) -> List[int]:
    """Token ids of a chat, ready for the assistant's reply (plain text without a chat template)."""
    if getattr(tokenizer, "has_chat_template", False):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return list(tokenizer.encode("\n".join(m["content"] for m in messages)))


def prefill(model, tokens: List[int], cache) -> mx.array:
    """Run the prompt through the model in chunks; return the last hidden state (1, H)."""
    if not tokens:
        raise ValueError("the prompt is empty")
    for start in range(0, len(tokens) - PREFILL_CHUNK, PREFILL_CHUNK):
        model(mx.array([tokens[start : start + PREFILL_CHUNK]]), cache)
        mx.eval(cache.state())
    done = (len(tokens) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
    return model(mx.array([tokens[done:]]), cache)[:, -1]


def plain_steps(model, prompt: List[int], sampling: SamplingConfig, cache=None) -> Iterator[List[int]]:
    """Autoregressive decoding: yields [token] per step, the next step already queued. A `cache`
    holding the prompt's first `cache.length` tokens continues from there; at every yield it
    holds the prompt and every token yielded so far."""
    cache = cache or model.make_cache()
    y = choose_tokens(model.logits(prefill(model, prompt[cache.length:], cache)), sampling)
    mx.async_eval(y)
    while True:
        next_y = choose_tokens(model.logits(model(y[None], cache)[:, -1]), sampling)
        mx.async_eval(next_y)
        yield [y.item()], 0
        y = next_y


def context_window(model) -> Optional[int]:
    """The model's context window in tokens (max_position_embeddings), or None where it declares none."""
    limit = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def surely_over(tokenizer, text: str, limit: Optional[int]) -> bool:
    """Whether `text` alone is longer than `limit` tokens, told from prefixes of it (4 x limit
    characters, doubling) so that a 16 MiB prompt is refused after tokenizing a little of it, not
    after 20 s of tokenizing it all. A prefix has at most a few tokens more than its part of the whole."""
    if not limit or len(text) <= 4 * limit or not is_unicode(text):  # a lone surrogate: named later
        return False
    size = 4 * limit
    while size < len(text):
        if len(tokenizer.encode(text[:size])) > limit + 64:
            return True
        size *= 2
    return False


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def lone_surrogate(text: str) -> Optional[str]:
    """The first half of a UTF-16 surrogate pair standing alone in text (what JSON's \\ud800 escapes and
    Python's reading of undecodable bytes, U+DC80..U+DCFF, leave), None when there is none."""
    if is_unicode(text):  # at C speed: most text has none
        return None
    return next(c for c in text if "\ud800" <= c <= "\udfff")


def encode_prompts(model, tokenizer, prompts, max_tokens: int) -> List[List[int]]:
    """Each prompt's ids (`encode_prompt`, chat template applied) for runs of up to max_tokens new
    tokens. A prompt that would not fit the model's context window with them is refused before any
    decoding (ValueError naming it), a huge one without tokenizing all of it."""
    limit = context_window(model)
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and surely_over(tokenizer, prompt, limit):
            raise ValueError(f"prompt {i + 1} is over {limit} tokens, the model's context window: shorten or drop it")
        ids = encode_prompt(tokenizer, prompt)
        if limit is not None and len(ids) + max_tokens > limit:
            raise ValueError(f"prompt {i + 1} is {len(ids)} tokens: with {max_tokens} new tokens it does not fit the "
                             f"model's context window of {limit}: shorten or drop it, or ask for fewer new tokens")
        out.append(ids)
    return out


def fit_context(ids: List[int], max_tokens: int, limit: Optional[int], keep_last: Optional[int] = None):
    """(prompt ids, max_tokens) that fit a context window of `limit` tokens (None: no limit).

    keep_last: use only the prompt's last N tokens (the start of a chat template
    included). A prompt that still leaves no room for one new token is refused
    with its length and the limit; otherwise max_tokens is clipped so that
    prompt + generated <= limit, and generation then ends there with
    finish_reason "length". The speculative decoder also verifies drafted
    tokens at up to `BeamShape.emit_length` - 1 positions past the last committed one; near
    the limit those positions may lie beyond it (RoPE computes them all the
    same), but tokens there are never emitted, and every emitted token sits
    inside the window, so no margin is needed.
    """
    if keep_last is not None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last (--keep-last) must be a positive number of tokens, got {keep_last!r}")
        ids = ids[-keep_last:]
    if limit is not None and len(ids) >= limit:
        raise ValueError(
            f"the prompt is {len(ids)} tokens, and the model's context window is {limit} "
            f"(prompt and reply together): shorten it, or keep only its last tokens with "
            f"--keep-last N / keep_last=N (N at most {limit - 1})"
        )
    if limit is not None:
        max_tokens = min(max_tokens, limit - len(ids))
    return ids, max_tokens


AUTO = "auto"

# mlx-lm arguments that mean something this package cannot honour exactly: refused by name,
# with what to pass instead, rather than silently ignored.
_REFUSED = {
    "draft_model": "pass drafter= (a ReDrafter drafter; `model.drafter` by default)",
    "sampler": "pass temp=, top_p=, top_k= or sampling=SamplingConfig(...): a sampler function is opaque to "
               "the lossless acceptance rule",
    "logits_processors": "logits processors are not supported",
    "min_p": "min_p is not supported (use top_p or top_k)",
    "repetition_penalty": "repetition penalties are not supported",
    "max_kv_size": "a rotating KV cache is not supported",
    "prompt_cache": "pass an mlx_redrafter.PromptCache() and the whole conversation as the prompt "
                    "(the longest prefix shared with a cached one is reused)",
    "kv_bits": "a quantized KV cache is not supported",
}
_IGNORED = ("prefill_step_size", "kv_group_size", "quantized_kv_start", "stream")  # performance knobs only


def sampling_from(sampling: Optional[SamplingConfig], temp=None, top_p=None, top_k=None, seed=None) -> SamplingConfig:
    """A SamplingConfig from either `sampling=` or mlx-lm's `temp` / `top_p` / `top_k` (not both).

    As in mlx-lm's `make_sampler`, top_p 0 (or 1) and top_k 0 are off.
    """
    loose = {k: v for k, v in (("temperature", temp), ("top_p", top_p), ("top_k", top_k), ("seed", seed))
             if v is not None}
    if sampling is not None:
        if loose:
            raise TypeError(f"pass either sampling= or {', '.join(loose)}, not both")
        return sampling
    if loose.get("top_p") == 0:
        loose["top_p"] = 1.0
    return SamplingConfig(**loose)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int], mx.array],
    drafter=AUTO,
    max_tokens: int = 256,
    sampling: Optional[SamplingConfig] = None,
    beam=None,
    chat_template: bool = True,
    keep_last: Optional[int] = None,
    speculative: bool = True,
    temp: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    prompt_cache=None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Yield one GenerationResponse per generated token (mlx-lm's `stream_generate`, speculative).

    prompt: text (wrapped in the tokenizer's chat template unless chat_template=False;
        mlx-lm encodes it as is), a chat (a list of {"role", "content"} messages, through the
        chat template), or token ids (a list or an mx.array), used as is.
    drafter: "auto" (default) uses `model.drafter`, the drafter `load()` attached;
        a `Drafter` uses that one (a directory path loads one, for this call only);
        None decodes plainly. speculative=False also
        decodes plainly. Greedy output is the same either way (lossless).
    max_tokens, temp, top_p, top_k: as in mlx-lm (temp 0 = greedy; top_p 0 or 1 and
        top_k 0 = off); or sampling=SamplingConfig(temperature, top_p, top_k, seed).
    beam: a `BeamShape` for the drafter's search (default `default_shape()`, the
        fastest measured for the device).
    keep_last: use only the last N tokens of the (encoded) prompt. A prompt that
        does not fit the model's context window raises ValueError; generation
        stops at the window (finish_reason "length") even before max_tokens
        (`fit_context`).
    prompt_cache: a `PromptCache`: the prompt continues from the cached conversation sharing its
        longest token prefix (only the rest is run), and this one is cached in turn. Unlike
        mlx-lm's, the prompt is the whole conversation, not only its new tokens.
    mlx-lm arguments this package cannot honour exactly (`sampler`, `draft_model`,
    `min_p`, ...) raise TypeError saying what to pass instead.

    >>> for r in mr.stream_generate(model, tokenizer, "Name three rivers.", max_tokens=64, temp=0.7):
    ...     print(r.text, end="", flush=True)
    """
    from .prompt_cache import PromptCache

    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        kwargs["prompt_cache"] = prompt_cache  # mlx-lm's list of caches: refused below
    for name in kwargs:
        if name in _REFUSED and not (name == "min_p" and not kwargs[name]):
            raise TypeError(f"stream_generate: {name}= is mlx-lm's; {_REFUSED[name]}")
        if name not in _REFUSED and name not in _IGNORED:
            raise TypeError(f"stream_generate() got an unexpected keyword argument {name!r}")
    sampling = sampling_from(sampling, temp, top_p, top_k, seed)
    from .drafter import drafter_from

    drafter = drafter_from(model, drafter)  # a drafter directory: loaded for this call only
    if not speculative:
        drafter = None
    ids, max_tokens = fit_context(encode_prompt(tokenizer, prompt, chat_template), max_tokens,
                                  context_window(model), keep_last)
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    beam = None if drafter is None else beam or chosen_shape(model, drafter, sampling)
    decoder = None if beam is None else decoder_for(model, drafter, beam, sampling)
    kind = cache_kind(model, decoder is not None)
    cache, cached = prompt_cache.take(ids, kind) if prompt_cache is not None else (None, 0)
    if cache is None:
        cache = model.make_cache() if decoder is None else decoder.make_cache()
    if decoder is None:  # no drafter, or `tune` measured plain decoding faster here
        steps = plain_steps(model, ids, sampling, cache)
    else:
        steps = ((tokens[0], counts[0]) for tokens, counts in decoder.run([ids], cache))
    if prompt_cache is not None:
        steps = prompt_cache.record(ids, cache, kind, steps)
    yield from _responses(tokenizer, steps, len(ids), max_tokens, speculative=decoder is not None, cached=cached)


def cache_kind(model, speculative: bool):
    """The prompt cache's key for a model's caches: plain and speculative caches are laid out apart."""
    return (id(model), "speculative" if speculative else "plain")


MAX_DECODERS = 8  # `tune` on a GPU cycles through 7 settings in a phase; each keeps up to MAX_TRACES verify traces (~5 MB each on a CPU)


def decoder_for(model, drafter, beam, sampling: SamplingConfig):
    """A `Decoder`, reused across calls with the same model, drafter, beam settings and sampling
    filters (any seed): its compiled graphs are traced once (a new trace costs ~40 ms on this CPU, a
    few percent of a short answer there; a 32-token answer on an H200 takes ~0.1 s). The MAX_DECODERS
    most recently used live on the model, so they go when the model goes."""
    from .decoding import Decoder

    decoders = model.__dict__.setdefault("_decoders", OrderedDict())  # not a module child: no parameters
    sampling = replace(sampling, seed=None)  # the seed seeds MLX's generator before decoding, not the graphs
    key = (id(drafter), beam, sampling)
    decoder = decoders.pop(key, None)
    if decoder is None or decoder.drafter is not drafter:
        decoder = Decoder(model, drafter, beam, sampling)
    decoders[key] = decoder
    while len(decoders) > MAX_DECODERS:
        decoders.popitem(last=False)
    return decoder


def chosen_shape(model, drafter, sampling: SamplingConfig):
    """The settings `mlx-redrafter tune` stored for this machine, model and drafter (None: decode
    plainly, it measured faster), else the device's built-in default."""
    from .beam_search import default_shape
    from .tune import load_tuned

    tuned = load_tuned(model, drafter)
    return default_shape() if tuned is None else tuned.for_sampling(sampling)


class Responses:
    """One sequence's GenerationResponses from its decoding steps: text, stop at EOS or max_tokens,
    speeds. `stream_generate` feeds it one sequence's steps; a batch feeds one per row."""

    def __init__(self, tokenizer, prompt_len: int, max_tokens: int, speculative: bool = False, cached: int = 0):
        self.detok = tokenizer.detokenizer  # a copy of its own
        self.eos = set(tokenizer.eos_token_ids)
        self.prompt_len, self.max_tokens, self.speculative, self.cached = prompt_len, max_tokens, speculative, cached
        self.start = time.perf_counter()
        self.n = self.n_steps = 0
        self.prompt_tps = 0.0
        self.finished = False

    def step(self, tokens: List[int], accepted: int) -> List[GenerationResponse]:
        """A response per token of one step, up to the one that finishes the sequence."""
        if self.n_steps == 0:
            self.first = time.perf_counter()
            self.prompt_tps = (self.prompt_len - self.cached) / (self.first - self.start)  # tokens run, as mlx-lm counts
        self.n_steps += 1
        out = []
        for i, token in enumerate(tokens):
            if self.finished:
                break
            self.n += 1
            finish = "stop" if token in self.eos else ("length" if self.n >= self.max_tokens else None)
            if token not in self.eos:
                self.detok.add_token(token)
            if finish:
                self.detok.finalize()
                self.finished = True
            out.append(self._response(token, i > 0, accepted, finish))
        return out

    def _response(self, token: int, from_draft: bool, accepted: int, finish: Optional[str]) -> GenerationResponse:
        elapsed = time.perf_counter() - self.first
        return GenerationResponse(
            text=self.detok.last_segment, token=token, from_draft=from_draft, step_accepted=accepted,
            prompt_tokens=self.prompt_len, prompt_tps=self.prompt_tps, generation_tokens=self.n,
            generation_tps=self.n / elapsed if elapsed > 0 else 0.0, steps=self.n_steps,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, speculative=self.speculative,
            cached_tokens=self.cached)


def _responses(tokenizer, steps, prompt_len: int, max_tokens: int, speculative: bool = False, cached: int = 0):
    mx.reset_peak_memory()
    sequence = Responses(tokenizer, prompt_len, max_tokens, speculative, cached)
    for tokens, accepted in steps:
        yield from sequence.step(tokens, accepted)
        if sequence.finished:
            return


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """The whole response as a string (mlx-lm's `generate`); arguments as in `stream_generate`.

    verbose=True prints the text as it comes and mlx-lm's report (prompt and
    generation tokens-per-sec, peak memory), then how the tokens were decoded.

    >>> import mlx_redrafter as mr
    >>> model, tokenizer = mr.load()
    >>> print(mr.generate(model, tokenizer, "Name three rivers.", max_tokens=64))
    >>> mr.generate(model, tokenizer, "Name three rivers.", speculative=False, verbose=True)  # plain, to compare
    """
    if verbose:
        print("=" * 10)
    text, last = [], None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose:
        print()
        if last is None:
            print("=" * 10)
            print("No text generated for this prompt")
        else:
            print_report(last, decoding=True)
    return "".join(text)


def print_report(r: GenerationResponse, file=None, decoding: bool = False):
    """mlx-lm's report; with `decoding`, a line on how the tokens were decoded. A slow-BLAS notice where one applies."""
    from . import backend

    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)
    if decoding:
        if r.speculative:
            print(f"Speculative: {r.steps} steps, {r.generation_tokens / max(r.steps, 1):.2f} tokens per step", file=file)
        else:
            print("Plain decoding (no drafter)", file=file)
    note = backend.blas_notice()
    if note:
        print(note, file=file)
