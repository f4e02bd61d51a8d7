"""What the draft costs on this device, and what the beam search's top-W selection costs in it:
the compiled draft graph (`Decoder.tree`: beam search, lookup, ranked tree) replayed on one
state, with the shipped selection (`beam_search.top_beams`: one partition over W x Vd) and a
two-stage one (each beam's top W, then the top W of those W x W), the selection alone at the
same sizes, and a plain one-token forward for scale.

    python benchmarks/draft_cost.py [--settings ranked:32x6:32,ranked:4x4] [--repeats 200] [--e2e 8 --max-tokens 128]
        [--head-products 4096,8192]

--head-products V,... also times the draft head's product alone (W rows x E against V x E) in the model's
dtype and kept quantized (MLX's quantized_matmul at 8 and 4 bits): what a wider draft vocabulary, or a head
left packed at run time, would cost.

--e2e N also times whole steps (`Decoder.run`, pipelined) with each selection, interleaved over the
first N prompts (both select the same nodes, so tokens per step are the same and the step time is the speed).

Prints a table and saves results/draft-cost-<device>.json (--out).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx

from mlx_redrafter import backend, beam_search, find_drafter, load
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.decoding import Decoder
from mlx_redrafter.generate import encode_prompt
from mlx_redrafter.outputs import write_file
from mlx_redrafter.sampling import SamplingConfig

from tree_modes import parse_setting

SHIPPED = beam_search.top_beams


def two_stage(candidates: mx.array, W: int):
    """The same W winners as `top_beams`: each beam's top W first (small partitions), then the top W of those."""
    B, beams, vocab = candidates.shape
    k = min(W, vocab)
    local = mx.argpartition(-candidates, k - 1, axis=-1)[..., :k]  # (B, W, k)
    flat = mx.take_along_axis(candidates, local, axis=-1).reshape(B, -1)
    top = mx.argpartition(-flat, W - 1, axis=-1)[:, :W]
    top = mx.take_along_axis(top, mx.argsort(-mx.take_along_axis(flat, top, axis=-1), axis=-1), axis=-1)
    return top // k, mx.take_along_axis(local.reshape(B, -1), top, axis=-1), mx.take_along_axis(flat, top, axis=-1)


VARIANTS = {"one partition (shipped)": SHIPPED, "two-stage": two_stage}


def timed(fn, repeats: int) -> dict:
    """ms per call evaluated one by one (what a step waits for) and queued back to back (device time)."""
    for _ in range(5):
        mx.eval(fn())
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    each = (time.perf_counter() - t) / repeats
    t = time.perf_counter()
    mx.eval([fn() for _ in range(repeats)])
    queued = (time.perf_counter() - t) / repeats
    return {"each_ms": 1000 * each, "queued_ms": 1000 * queued}


def head_products(E: int, vocabs, rows, dtype, repeats: int) -> dict:
    """ms per product (rows, E) x (V, E)^T: dense in dtype, and packed 8- and 4-bit (groups of 64)."""
    out = {}
    for V in vocabs:
        for M in rows:
            x, w = mx.random.normal((M, E)).astype(dtype), (0.02 * mx.random.normal((V, E))).astype(dtype)
            fns = {"dense": lambda: x @ w.T}
            for bits in (8, 4):
                packed = mx.quantize(w, 64, bits)
                fns[f"{bits}-bit"] = lambda p=packed, b=bits: mx.quantized_matmul(x, *p, transpose=True, group_size=64, bits=b)
            out[f"{M}x{E}x{V}"] = row = {name: timed(fn, repeats)["each_ms"] for name, fn in fns.items()}
            print(f"  head product {M:>3} x {E} x {V:>5}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()))
    return out


def with_selection(fn, work):
    beam_search.top_beams = fn  # read when a compiled graph is traced: set around every use
    try:
        return work()
    finally:
        beam_search.top_beams = SHIPPED


def run_ms_per_step(decoder: Decoder, prompt, max_tokens: int) -> tuple:
    start, steps, tokens = time.perf_counter(), 0, 0
    for emitted, _ in decoder.run([prompt]):
        steps, tokens = steps + 1, tokens + len(emitted[0])
        if tokens >= max_tokens:
            break
    return 1000 * (time.perf_counter() - start) / steps, tokens / steps


def end_to_end(model, prompts, shape, max_tokens: int) -> dict:
    decoders = {name: Decoder(model, model.drafter, shape, SamplingConfig()) for name in VARIANTS}
    for name, fn in VARIANTS.items():  # warm every span the runs will reach
        with_selection(fn, lambda: run_ms_per_step(decoders[name], prompts[0], max_tokens))
    runs = {name: [] for name in VARIANTS}
    for prompt in prompts:
        for name, fn in VARIANTS.items():
            runs[name].append(with_selection(fn, lambda: run_ms_per_step(decoders[name], prompt, max_tokens)))
    base = runs[next(iter(VARIANTS))]
    out = {}
    for name, rs in runs.items():
        ratios = sorted(b[0] / r[0] for b, r in zip(base, rs))
        out[name] = {"ms_per_step": statistics.median(r[0] for r in rs), "tokens_per_step": statistics.mean(r[1] for r in rs),
                     "speed_vs_shipped_median": statistics.median(ratios), "speed_vs_shipped_range": [ratios[0], ratios[-1]]}
        print(f"  end to end {name:>24}: {out[name]['ms_per_step']:.2f} ms/step, {out[name]['tokens_per_step']:.2f} tokens/step, "
              f"speed x{out[name]['speed_vs_shipped_median']:.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--drafter")
    p.add_argument("--prompts", type=Path)
    p.add_argument("--settings", default="ranked:32x6:32,ranked:4x4")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--e2e", type=int, default=0, help="also time whole steps over this many prompts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--head-products", help="draft vocabulary sizes V,... whose head product to time alone")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    model, tok = load(args.model, drafter=find_drafter(args.model) if args.drafter is None else args.drafter, dtype=args.dtype)
    prompts = [encode_prompt(tok, t) for t in prompt_texts(args.prompts)[: max(1, args.e2e)]]
    prompt = prompts[0]
    results = {"machine": backend.machine(), "drafter": getattr(model.drafter, "source", "default"), "settings": {}}
    one = mx.array([prompt[-1:]])
    plain = timed(lambda: model.logits(model(one, model.make_cache())[:, -1]), args.repeats)
    results["one_token_forward_no_cache"] = plain
    print(f"one-token forward (fresh cache): {plain['each_ms']:.2f} ms each, {plain['queued_ms']:.2f} queued")
    for text in args.settings.split(","):
        shape = parse_setting(text, lookup=True)
        row = {}
        for name, fn in VARIANTS.items():
            decoder = Decoder(model, model.drafter, shape, SamplingConfig())
            state = decoder.prefill([prompt])
            args_ = (state.hidden, state.g0, state.history, state.cache.lengths)
            draft = with_selection(fn, lambda: timed(lambda: decoder.tree(*args_), args.repeats))
            cand = mx.random.normal((1, shape.width, model.drafter.config.draft_vocab))
            select = timed(lambda: fn(cand, shape.width), args.repeats)
            row[name] = {"draft": draft, "selection": select}
            print(f"{text:>16} {name:>24}: draft {draft['each_ms']:.2f} ms each / {draft['queued_ms']:.2f} queued; "
                  f"selection {select['each_ms']:.3f} / {select['queued_ms']:.3f}")
        if args.e2e:
            row["end_to_end"] = end_to_end(model, prompts, shape, args.max_tokens)
        results["settings"][text] = row
    if args.head_products:
        widths = sorted({parse_setting(t, lookup=True).width for t in args.settings.split(",")})
        results["head_products_ms"] = head_products(model.drafter.config.exit_dim or model.args.hidden_size,
                                                    [int(v) for v in args.head_products.split(",")], widths,
                                                    model.model.norm.weight.dtype, args.repeats)
    out = args.out or Path(f"results/draft-cost-{'gpu' if backend.on_gpu() else 'cpu'}.json")
    write_file(out, json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
