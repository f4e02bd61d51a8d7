"""Where a ReDrafter step's time goes: tree build, verify, accept+commit, draft, host.

    python benchmarks/step_breakdown.py [--drafter D] [--shapes 1x4,2x5,4x5] [--limit 5]

Each phase is evaluated on its own (so the sum is a little above the pipelined
step). Prints a table and saves results/step_breakdown-<device>.json.
"""

import argparse
import json
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

from mlx_redrafter import backend, load
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter.cli import find_drafter
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.generate import encode_prompt
from mlx_redrafter.sampling import SamplingConfig
from mlx_redrafter.speculative import speculative_steps


def profile_shape(model, drafter, prompts, shape, max_tokens):
    times, steps, tokens = {}, 0, 0
    for ids in prompts:
        for i, (emitted, _) in enumerate(speculative_steps(model, drafter, ids, SamplingConfig(), shape, profile=times)):
            steps += 1
            tokens += len(emitted)
            if tokens >= max_tokens * (prompts.index(ids) + 1):
                break
    per_step = {k: 1000 * v / steps for k, v in times.items()}
    return {"width": shape.width, "length": shape.length, "steps": steps, "tokens_per_step": tokens / steps,
            "ms_per_step": per_step, "total_ms": sum(per_step.values())}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--drafter")
    p.add_argument("--prompts", type=Path)
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--shapes", default="1x4,2x4,4x5,8x6")
    p.add_argument("--out", default="results")
    args = p.parse_args()
    model, tok, _ = load(args.model)
    path = find_drafter(args.model, args.drafter)
    if path is None:
        raise SystemExit("error: no drafter: pass --drafter")
    drafter = load_drafter(path, model)
    prompts = [encode_prompt(tok, t) for t in prompt_texts(args.prompts, args.limit)]
    shapes = [BeamShape(*map(int, s.split("x"))) for s in args.shapes.split(",")]
    profile_shape(model, drafter, prompts[:1], shapes[0], 16)  # warm-up
    rows = []
    print(f"{'W x Lb':>7} {'tok/step':>8} " + " ".join(f"{k:>14}" for k in ("tree", "verify", "accept+commit", "draft", "host", "total")) + "  (ms per step)")
    for shape in shapes:
        profile_shape(model, drafter, prompts[:1], shape, 16)  # warm this shape's buckets
        r = profile_shape(model, drafter, prompts, shape, args.max_tokens)
        rows.append(r)
        ms = r["ms_per_step"]
        print(f"{shape.width:>3} x {shape.length:<2} {r['tokens_per_step']:8.2f} " + " ".join(
            f"{ms.get(k, 0):14.2f}" for k in ("tree", "verify", "accept+commit", "draft", "host")) + f" {r['total_ms']:14.2f}")
    device = "gpu" if backend.on_gpu() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_breakdown-{device}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
