"""Time to first token of a long chat's second turn, with and without prompt-cache reuse.

Turn 1 is a long user message (MT-Bench questions joined, about --context tokens) and the model's
greedy reply; turn 2 adds a short question. "fresh" runs turn 2's whole prompt; "reuse" continues
from turn 1's cache (`PromptCache`, as `serve` and `chat` do) and runs only the new tokens. The
cache is refilled before each timed reuse by one untimed prefill of the history turn 1 leaves. The two
are interleaved, after a warm-up of each, and the medians reported.

    python benchmarks/ttft_reuse.py [--model M] [--drafter D] [--context 2000] [--repeats 5] [--out results/ttft-reuse-cpu.json]
"""

import argparse
import json
import statistics
import time

import mlx_redrafter as mr  # noqa: F401  (fast BLAS before mlx)

from mlx_redrafter import PromptCache, backend, load, stream_generate
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.generate import encode_messages
from mlx_redrafter.outputs import check_new_files, write_file
from mlx_redrafter.prompt_cache import common_prefix


def first_token_seconds(model, tokenizer, chat, cache=None):
    start = time.perf_counter()
    responses = stream_generate(model, tokenizer, chat, max_tokens=1, prompt_cache=cache)
    first = next(responses)
    seconds = time.perf_counter() - start
    responses.close()
    return seconds, first


def long_chat(model, tokenizer, context: int, reply_tokens: int, prompts=None):
    """(turn 2's messages, the tokens turn 1 leaves in the cache: its prompt and reply)."""
    texts, words = prompt_texts(prompts), []
    while len(encode_messages(tokenizer, [{"role": "user", "content": " ".join(words)}])) < context:
        words.append(texts[len(words) % len(texts)])
    turn1 = [{"role": "user", "content": "Answer the last of these questions.\n\n" + "\n\n".join(words)}]
    responses = list(stream_generate(model, tokenizer, turn1, max_tokens=reply_tokens))
    reply = "".join(r.text for r in responses)
    history = encode_messages(tokenizer, turn1) + [r.token for r in responses]
    return turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Say that in one line."}], history


def primed(model, tokenizer, turn2, history):
    """A cache holding what turn 1 leaves in it (the part of its prompt and reply that turn 2 repeats),
    filled by one prefill rather than by decoding the reply again."""
    ids = encode_messages(tokenizer, turn2)
    cache = PromptCache()
    for _ in stream_generate(model, tokenizer, ids[: common_prefix(ids, history)], max_tokens=1, prompt_cache=cache):
        pass
    return cache


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model")
    p.add_argument("--drafter")
    p.add_argument("--prompts", help="questions to build the chat from (default: MT-Bench)")
    p.add_argument("--context", type=int, default=2000, help="tokens of turn 1's prompt (at least)")
    p.add_argument("--reply-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file (default results/ttft-reuse-<cpu|gpu>.json)")
    p.add_argument("--force", action="store_true", help="replace --out")
    args = p.parse_args()
    out = args.out or f"results/ttft-reuse-{'gpu' if backend.on_gpu() else 'cpu'}.json"
    check_new_files([out], args.force)
    model, tokenizer = load(args.model, drafter="auto" if args.drafter is None else args.drafter)
    turn2, history = long_chat(model, tokenizer, args.context, args.reply_tokens, args.prompts)
    fresh, reuse = [], []
    for i in range(args.repeats + 1):  # the first round warms both paths up and is not counted
        seconds, r_fresh = first_token_seconds(model, tokenizer, turn2)
        cache = primed(model, tokenizer, turn2, history)
        seconds_reuse, r_reuse = first_token_seconds(model, tokenizer, turn2, cache)
        assert r_fresh.token == r_reuse.token
        if i:
            fresh.append(seconds)
            reuse.append(seconds_reuse)
    result = {"machine": backend.machine(), "model": args.model or "default", "prompt_tokens": r_reuse.prompt_tokens,
              "cached_tokens": r_reuse.cached_tokens, "repeats": args.repeats,
              "ttft_fresh_s": statistics.median(fresh), "ttft_reuse_s": statistics.median(reuse),
              "fresh_s": fresh, "reuse_s": reuse}
    result["speedup"] = result["ttft_fresh_s"] / result["ttft_reuse_s"]
    print(f"turn 2: {result['prompt_tokens']} prompt tokens, {result['cached_tokens']} from the cache")
    print(f"time to first token: fresh {result['ttft_fresh_s'] * 1e3:.0f} ms, reuse {result['ttft_reuse_s'] * 1e3:.0f} ms "
          f"({result['speedup']:.1f}x), median of {args.repeats} ({result['machine']})")
    write_file(out, json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
