"""Cost curves: verify time against tree tokens, drafter time against W and Lb, for the default
model or a random-weight model of a given shape (e.g. --shape llama-7b on the GPU). From them and a
measured acceptance it estimates the speedup a model of that shape would see (an estimate).

    python benchmarks/cost_curves.py [--shape default|llama-7b] [--tokens-per-step 2.5]
"""

import argparse
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401
import mlx.core as mx

from mlx_redrafter import backend, load
from mlx_redrafter.beam_search import BeamShape, beam_search
from mlx_redrafter.drafter import DrafterConfig, init_drafter
from mlx_redrafter.llama import Model, ModelArgs
from mlx_redrafter.loading import cast

SHAPES = {
    "llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}


def timed(fn, repeat=10):
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1000 * (time.perf_counter() - t) / repeat


def verify_ms(model, n, context=256):
    cache = model.make_cache()
    mx.eval(model(mx.zeros((1, context), dtype=mx.int32), cache))
    tokens = mx.zeros((1, n), dtype=mx.int32)
    mask = mx.ones((n, context + n), dtype=mx.bool_)
    positions = mx.arange(context, context + n)[None]

    def step():
        cache.truncate(context)
        mx.eval(model.logits(model(tokens, cache, positions if n > 1 else None, mask if n > 1 else None)))

    return timed(step)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="default")
    p.add_argument("--tokens-per-step", type=float, default=None, help="Measured acceptance to estimate speedup with.")
    p.add_argument("--tree-tokens", type=int, default=16, help="Tree size at that acceptance.")
    p.add_argument("--out", default="results")
    args = p.parse_args()
    if args.shape == "default":
        model = load(drafter=None)[0]
    else:
        model = Model(ModelArgs.from_dict(SHAPES[args.shape]))
        cast(model, backend.default_dtype())
        mx.eval(model.parameters())
    a = model.args
    drafter = init_drafter(DrafterConfig(a.vocab_size, a.hidden_size, a.hidden_size, 2, shared_lm_head=True), model)
    cast(drafter, backend.default_dtype())
    verify = {n: verify_ms(model, n) for n in (1, 2, 4, 8, 16, 24, 32, 48, 64)}
    print("verify ms by tree tokens:", {k: round(v, 2) for k, v in verify.items()})
    h, g0 = mx.zeros((a.hidden_size,), dtype=backend.default_dtype()), mx.array(1)
    draft = {}
    for w in (1, 2, 4, 8):
        for lb in (2, 3, 4, 5, 6, 8):
            draft[f"{w}x{lb}"] = timed(lambda: mx.eval(beam_search(drafter, model, h, g0, BeamShape(w, lb))))
    print("drafter ms by WxLb:", {k: round(v, 2) for k, v in draft.items()})
    record = {"shape": args.shape, "device": "gpu" if backend.on_gpu() else "cpu", "dtype": str(backend.default_dtype()),
              "verify_ms": verify, "draft_ms": draft}
    if args.tokens_per_step:
        n = args.tree_tokens
        step = verify.get(n) or verify[min(verify, key=lambda k: abs(k - n))]
        est = args.tokens_per_step * verify[1] / (step + draft["4x5"])
        record["estimate"] = {"tokens_per_step": args.tokens_per_step, "tree_tokens": n, "speedup_estimate": est}
        print(f"ESTIMATE: at {args.tokens_per_step} tokens/step and {n} tree tokens, a {args.shape} model would run "
              f"~{est:.2f}x faster than plain decoding (verify {step:.2f} ms + draft {draft['4x5']:.2f} ms vs "
              f"{verify[1]:.2f} ms per token)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cost_curves-{args.shape}-{record['device']}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
