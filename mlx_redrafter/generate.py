"""Text generation API: plain decoding with the base model, or ReDrafter speculation.

    model, tokenizer, _ = load()
    for r in stream_generate(model, tokenizer, "Hello", max_tokens=32):
        print(r.text, end="")
"""

import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Union

import mlx.core as mx

from .sampling import SamplingConfig, choose_tokens

PREFILL_CHUNK = 512


@dataclass
class GenerationResponse:
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


def encode_prompt(tokenizer, prompt: Union[str, List[int]], chat_template: bool = True) -> List[int]:
    if not isinstance(prompt, str):
        return list(prompt)
    if chat_template:
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer.encode(prompt))


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


def plain_steps(model, prompt: List[int], sampling: SamplingConfig) -> Iterator[List[int]]:
    """Autoregressive decoding: yields [token] per step, the next step already queued."""
    cache = model.make_cache()
    y = choose_tokens(model.logits(prefill(model, prompt, cache)), sampling)
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


def fit_context(ids: List[int], max_tokens: int, limit: Optional[int], keep_last: Optional[int] = None):
    """(prompt ids, max_tokens) that fit a context window of `limit` tokens (None: no limit).

    keep_last: use only the prompt's last N tokens (the start of a chat template
    included). A prompt that still leaves no room for one new token is refused
    with its length and the limit; otherwise max_tokens is clipped so that
    prompt + generated <= limit, and generation then ends there with
    finish_reason "length". The speculative decoder also verifies drafted
    tokens at up to beam length - 1 positions past the last committed one; near
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


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    drafter=None,
    max_tokens: int = 256,
    sampling: Optional[SamplingConfig] = None,
    beam=None,
    chat_template: bool = True,
    keep_last: Optional[int] = None,
) -> Iterator[GenerationResponse]:
    """Yield one GenerationResponse per generated token.

    drafter: a ReDrafter `Drafter` for speculative decoding, or None for plain decoding.
    beam: a `BeamShape` (width, length) for the drafter's beam search.
    keep_last: use only the last N tokens of the (encoded) prompt. A prompt that
        does not fit the model's context window raises ValueError; generation
        stops at the window (finish_reason "length") even before max_tokens
        (`fit_context`).
    """
    sampling = sampling or SamplingConfig()
    ids, max_tokens = fit_context(encode_prompt(tokenizer, prompt, chat_template), max_tokens,
                                  context_window(model), keep_last)
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    beam = None if drafter is None else beam or chosen_shape(model, drafter, sampling)
    if beam is None:  # no drafter, or `tune` measured plain decoding faster here
        steps = plain_steps(model, ids, sampling)
    else:
        from .decoding import Decoder

        decoder = Decoder(model, drafter, beam, sampling)
        steps = ((tokens[0], counts[0]) for tokens, counts in decoder.run([ids]))
    yield from _responses(tokenizer, steps, len(ids), max_tokens)


def chosen_shape(model, drafter, sampling: SamplingConfig):
    """The settings `mlx-redrafter tune` stored for this machine, model and drafter (None: decode
    plainly, it measured faster), else the device's built-in default."""
    from .beam_search import default_shape
    from .tune import load_tuned

    tuned = load_tuned(model, drafter)
    return default_shape() if tuned is None else tuned.for_sampling(sampling)


def _responses(tokenizer, steps, prompt_len: int, max_tokens: int):
    detok = tokenizer.detokenizer
    detok.reset()
    eos = set(tokenizer.eos_token_ids)
    mx.reset_peak_memory()
    start = time.perf_counter()
    n = n_steps = 0
    prompt_tps = 0.0
    for tokens, accepted in steps:
        if n_steps == 0:
            first = time.perf_counter()
            prompt_tps = prompt_len / (first - start)
        n_steps += 1
        for i, token in enumerate(tokens):
            n += 1
            finish = "stop" if token in eos else ("length" if n >= max_tokens else None)
            if token not in eos:
                detok.add_token(token)
            if finish:
                detok.finalize()
            elapsed = time.perf_counter() - first
            yield GenerationResponse(
                text=detok.last_segment,
                token=token,
                from_draft=i > 0,
                step_accepted=accepted,
                prompt_tokens=prompt_len,
                prompt_tps=prompt_tps,
                generation_tokens=n,
                generation_tps=n / elapsed if elapsed > 0 else 0.0,
                steps=n_steps,
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
            )
            if finish:
                return


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """The whole response as a string; see `stream_generate` for the arguments."""
    text, last = [], None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print_report(last)
    return "".join(text)


def print_report(r: GenerationResponse, file=None):
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)
