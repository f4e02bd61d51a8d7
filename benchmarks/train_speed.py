"""Training steps per second of this checkout against another one, interleaved in fresh processes.

    python benchmarks/train_speed.py --data DIR --against ROOT [--steps 300] [--rounds 3] [--out F]
    python benchmarks/train_speed.py --data DIR --against . --cache-gb 2,32  (MLX's buffer cache capped at 2 GB as
                                                                          scripts/mlx_capped.py does, against 32 GB)

ROOT is another checkout of the package (e.g. `git worktree add /tmp/prev HEAD~1`, or the package's
folder copied under ROOT/mlx_redrafter). DIR is a finished distillation data folder (e.g.
`scripts/kept_sets.sh steer4`, then untar .device/kept/data-steer4.tar). Each round runs one process
for each checkout, the order alternating from round to round; a process trains the shipped recipe's
drafter shape (reduced 4096-token head, E = 2H, base layers 4 and 15 read, unroll 6, batch 32) from
scratch with `training.fit`: 20 steps to warm up (--warmup) (kernels, the allocator), then --steps steps timed by
fit itself (its `wall_seconds`, to 0.1 s: the loop alone, no data loading or saving). --cache-gb THIS,AGAINST caps
MLX's buffer cache in each checkout's processes (0: MLX's default). Prints each run, the median ratio with its
range, and saves the rows as JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]


def measure(data: Path, model, steps: int, warmup: int, batch_size: int, cache_gb: float = 0) -> dict:
    """One process's run: `warmup` steps, then `steps` timed steps of `training.fit` (imported from PYTHONPATH's package)."""
    import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)
    import mlx.core as mx

    if cache_gb:
        mx.set_cache_limit(int(cache_gb * 2**30))

    from mlx_redrafter import training
    from mlx_redrafter.loading import model_for

    base, _, _ = model_for(model, None, drafter=None, dtype="auto")
    examples = training.sequences_for(base, data)
    cfg = dict(head="reduced", draft_vocab_size=4096, exit_dim=2 * base.args.hidden_size, feature_layers=[4, 15],
               unroll=6, batch_size=batch_size, epochs=1, holdout=0, checkpoint_every=10**9)
    with tempfile.TemporaryDirectory() as tmp:
        training.fit(base, examples, Path(tmp) / "warm", training.TrainConfig(**cfg, max_steps=warmup), progress=False)
        _, metrics = training.fit(base, examples, Path(tmp) / "timed", training.TrainConfig(**cfg, max_steps=steps),
                                  progress=False, save_dtype=mx.float16)
    return {"package": str(Path(mlx_redrafter.__file__).parent), "cache_gb": cache_gb, "steps": metrics["steps"],
            "seconds": metrics["wall_seconds"], "steps_per_second": metrics["steps"] / metrics["wall_seconds"]}


def run_in(root: Path, args, cache_gb: float) -> dict:
    """`measure` in a fresh process importing the package under `root`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--data", str(args.data.resolve()),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--cache-gb", str(cache_gb)]
    model = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model  # or a Hub id
    cmd += ["--model", model] if model else []
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the run under {root} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a finished distillation data folder")
    ap.add_argument("--against", type=Path, help="another checkout's root (required unless --worker)")
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first in each process")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-gb", default="0,0", help="THIS,AGAINST: MLX's buffer cache cap in GB (0: MLX's default)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.data, args.model, args.steps, args.warmup, args.batch_size, float(args.cache_gb))))
        return
    try:
        caps = dict(zip(("this", "against"), [float(x) for x in args.cache_gb.split(",", 1)], strict=True))
        if not all(0 <= gb < float("inf") for gb in caps.values()):  # nan fails both
            raise ValueError
    except ValueError:
        sys.exit(f"--cache-gb {args.cache_gb!r}: give two numbers of GB, THIS,AGAINST (0: MLX's default), e.g. 2,32")
    from mlx_redrafter import backend  # this checkout's, before any round runs
    from mlx_redrafter.outputs import write_file

    if not args.against or not (args.against / "mlx_redrafter" / "__init__.py").is_file():
        sys.exit(f"--against {args.against}: no mlx_redrafter package there; give another checkout's root")
    roots = {"this": HERE, "against": args.against.resolve()}
    rows = []
    for r in range(args.rounds):
        for name in (("this", "against") if r % 2 == 0 else ("against", "this")):
            row = {"round": r, "checkout": name, **run_in(roots[name], args, caps[name])}
            rows.append(row)
            cache = f"{caps[name]:g} GB" if caps[name] else "MLX default"
            print(f"round {r} {name} (cache {cache}): {row['steps']} steps in {row['seconds']:.1f} s, "
                  f"{row['steps_per_second']:.2f} steps/s", flush=True)
    speed = {(x["round"], x["checkout"]): x["steps_per_second"] for x in rows}
    ratios = np.array([speed[r, "this"] / speed[r, "against"] for r in range(args.rounds)])
    summary = {"median_ratio": float(np.median(ratios)), "range": [float(ratios.min()), float(ratios.max())]}
    print(f"this checkout: {summary['median_ratio']:.3f}x the steps per second of {args.against} "
          f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})")
    out = args.out or Path(f"results/{'gpu' if backend.on_gpu() else 'cpu'}/train-speed.json")
    write_file(out, json.dumps({"machine": backend.machine(), "model": args.model or "the default model",
                                "data": str(args.data), "against": str(args.against), "steps": args.steps,
                                "warmup": args.warmup, "batch_size": args.batch_size, "cache_gb": caps,
                                "summary": summary, "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
