"""Training steps with examples packed into shared rows against one example a row, interleaved on the same batches.

    python benchmarks/train_packing.py --data DIR [--drafter DIR] [--batches 8] [--batch-size 32] [--out F]

DIR is a finished distillation data folder (e.g. `scripts/kept_sets.sh steer4`, then untar
.device/kept/data-steer4.tar). A step is what `training.fit` computes for one batch: the batch's
layout, the frozen base model's forward, the drafter's loss and gradient (the optimizer's update
is the same either way and left out). Each batch is timed both ways, the order alternating from
batch to batch, after one warm-up of each (on a GPU, each batch is also run both ways untimed first:
new shapes compile kernels there). The drafter's unroll and seq_len are those it was trained with.
The host's share of a step (building its lazy graph, which the device waits for) is reported too.
Prints a table and saves every row as JSON.
"""

import argparse
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_redrafter import backend, training
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.defaults import DEFAULT_DRAFTER
from mlx_redrafter.loading import model_for
from mlx_redrafter.outputs import write_file


def step_seconds(base, drafter, loss_and_grad, rows, cfg, pack: bool):
    """Seconds of one training step's computation on `rows`, of it the host's building of the lazy graph
    (a device waits for it, as `fit` evaluates each step before building the next), and the base-model
    positions it ran."""
    start = time.perf_counter()
    batch = training.make_batch(rows, cfg.seq_len, cfg.unroll, pack)
    (total, _, _), grads = loss_and_grad(drafter, *training.base_inputs(base, drafter, batch, cfg, with_teacher=False)[:4])
    built = time.perf_counter()
    mx.eval(total, grads)
    return time.perf_counter() - start, built - start, int(batch.x.size)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a finished distillation data folder")
    ap.add_argument("--model")
    ap.add_argument("--drafter", type=Path, help="its shape is trained (default: the packaged drafter)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    base, _, _ = model_for(args.model, None, drafter=None, dtype="auto")
    source = args.drafter or DEFAULT_DRAFTER
    drafter = load_drafter(source, base, dtype=mx.float32)
    base.freeze()
    trained = json.loads((source / "config.json").read_text()).get("training", {}).get("train_config", {})
    cfg = training.TrainConfig(batch_size=args.batch_size, unroll=trained.get("unroll", 6), seq_len=trained.get("seq_len", 640))
    examples = training.with_targets(training.sequences_for(base, args.data), cfg)
    to_draft = training.draft_ids(drafter)
    loss_and_grad = nn.value_and_grad(drafter, lambda d, *a: training.drafter_sums(d, base, *a, cfg, to_draft, None))
    rng = np.random.default_rng(args.seed)
    draw = lambda: [examples[j] for j in rng.choice(len(examples), args.batch_size, replace=False)]  # noqa: E731
    for pack in (True, False):  # warm-up: kernels and the allocator
        step_seconds(base, drafter, loss_and_grad, draw(), cfg, pack)
    rows = []
    for i in range(args.batches):
        batch = draw()
        timed = {}
        for pack in (True, False) if backend.on_gpu() else ():  # a batch's shapes compile on a GPU: not timed
            step_seconds(base, drafter, loss_and_grad, batch, cfg, pack)
        for pack in ((True, False) if i % 2 == 0 else (False, True)):
            timed[pack] = step_seconds(base, drafter, loss_and_grad, batch, cfg, pack)
        row = {"batch": i, "tokens": int(sum(min(len(t), cfg.seq_len) for t, _ in batch)),
               "packed_seconds": timed[True][0], "packed_build_seconds": timed[True][1], "packed_positions": timed[True][2],
               "one_a_row_seconds": timed[False][0], "one_a_row_positions": timed[False][2]}
        row["speedup"] = row["one_a_row_seconds"] / row["packed_seconds"]
        rows.append(row)
        print(f"batch {i}: {row['tokens']} tokens; one a row {row['one_a_row_positions']} positions "
              f"{row['one_a_row_seconds']:.2f} s, packed {row['packed_positions']} positions "
              f"{row['packed_seconds']:.2f} s: {row['speedup']:.2f}x", flush=True)
    speedups = np.array([r["speedup"] for r in rows])
    q1, median, q3 = np.percentile(speedups, [25, 50, 75])
    summary = {"median_speedup": median, "iqr": [q1, q3],
               "seconds_per_step": {"packed": float(np.mean([r["packed_seconds"] for r in rows])),
                                    "one_a_row": float(np.mean([r["one_a_row_seconds"] for r in rows]))},
               "positions_per_step": {"packed": float(np.mean([r["packed_positions"] for r in rows])),
                                      "one_a_row": float(np.mean([r["one_a_row_positions"] for r in rows]))},
               "packed_graph_build_seconds": float(np.median([r["packed_build_seconds"] for r in rows]))}
    print(f"packed: {median:.2f}x the steps per second of one example a row (IQR {q1:.2f}-{q3:.2f}), "
          f"{summary['seconds_per_step']['packed']:.2f} against {summary['seconds_per_step']['one_a_row']:.2f} s a step; "
          f"building a step's graph on the host: {1000 * summary['packed_graph_build_seconds']:.1f} ms (median)")
    out = args.out or Path(f"results/{'gpu' if backend.on_gpu() else 'cpu'}/train-packing.json")
    write_file(out, json.dumps({"machine": backend.machine(), "model": args.model or "the default model",
                                "data": str(args.data), "drafter": str(drafter.source),
                                "batch_size": args.batch_size, "seq_len": cfg.seq_len, "unroll": cfg.unroll,
                                "summary": summary, "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
