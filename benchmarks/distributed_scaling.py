"""Distillation-data and training throughput with 1 and with N processes over mx.distributed.

    python benchmarks/distributed_scaling.py [--ranks 2] [--backend ring] [--repeats 2] [--out results/cpu]

The driver starts the same worker plainly (1 process) and under `mlx.launch -n N`
(ring backend on localhost by default, each rank's BLAS given its share of the cores;
`--backend nccl` on a machine with N GPUs),
alternating 1, N, 1, N, ... so load changes hit both alike. Each worker loads the
default model, writes greedy replies to MT-Bench prompts (prompts/s; shards of 2
prompts so N ranks share the work), then trains a reduced-vocabulary drafter on them for a few steps
with one global batch (steps/s after the first step, which compiles). Prints a
table and saves distributed-scaling.json (refuses to replace one without --force).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, NEW_TOKENS, GEN_BATCH, SHARD = 8, 16, 2, 2
STEPS, BATCH = 4, 4


def worker(tmp: Path):
    import mlx_redrafter as mr
    import mlx.core as mx
    from mlx_redrafter import training
    from mlx_redrafter.data import Conversation, mt_bench_prompts
    from mlx_redrafter.distill import DataConfig, make_distillation_data, read_sequences
    from mlx_redrafter.distributed import world

    group = world()
    base, tokenizer = mr.load(drafter=None)
    conversations = [Conversation(p) for p in mt_bench_prompts()[:PROMPTS]]
    cfg = DataConfig(max_new_tokens=NEW_TOKENS, batch_size=GEN_BATCH, shard_size=SHARD)
    group.barrier()
    start = time.perf_counter()
    make_distillation_data(base, tokenizer, conversations, tmp / "data", cfg, progress=False)  # ends in a barrier
    data_seconds = time.perf_counter() - start
    examples = read_sequences(tmp / "data")
    tokens = sum(len(t) - p for t, p in examples)
    times = []
    real = training.make_batch

    def timed(*args):  # the time between batches is one step's
        times.append(time.perf_counter())
        return real(*args)

    training.make_batch = timed
    tcfg = training.TrainConfig(head="reduced", draft_vocab_size=1024, unroll=4, batch_size=BATCH, max_steps=STEPS,
                                epochs=100, seq_len=128, checkpoint_every=10**6)
    training.fit(base, examples, tmp / "run", tcfg, progress=False)
    steps = len(times) - 1
    if group.is_main:
        print(json.dumps({"ranks": group.size, "prompts_per_s": len(examples) / data_seconds,
                          "tokens_per_s": tokens / data_seconds, "data_seconds": data_seconds,
                          "train_steps_per_s": steps / (times[-1] - times[0]), "batch": BATCH}), flush=True)


def run(ranks: int, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--worker", tmp]
        if ranks > 1:
            launcher = "from mlx._distributed_utils.launch import main; main()"  # the `mlx.launch` command
            command = [sys.executable, "-c", launcher, "-n", str(ranks), "--backend", backend, "--", *command]
        # N processes on one machine share its cores: each BLAS gets its share, not all of them
        threads = str(max(1, (os.cpu_count() or 1) // ranks))
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads} if ranks > 1 else None
        out = subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=env)
        if out.returncode != 0:
            raise SystemExit(f"error: the {ranks}-process run failed: {(out.stderr or out.stdout).strip()[-400:]}")
        return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--backend", default="ring")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/cpu"))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker))
    from mlx_redrafter.backend import machine
    from mlx_redrafter.outputs import check_new_files, write_file

    target = args.out / "distributed-scaling.json"
    check_new_files([target], args.force)
    runs = []
    for _ in range(args.repeats):
        for ranks in (1, args.ranks):
            runs.append(run(ranks, args.backend))
            print(runs[-1], flush=True)
    best = {n: {k: max(r[k] for r in runs if r["ranks"] == n) for k in ("prompts_per_s", "train_steps_per_s")}
            for n in (1, args.ranks)}
    for key in ("prompts_per_s", "train_steps_per_s"):
        best["efficiency_" + key] = best[args.ranks][key] / (args.ranks * best[1][key])
    print(f"| processes | data prompts/s | training steps/s (global batch {BATCH}) |\n|---|---|---|")
    for n in (1, args.ranks):
        print(f"| {n} | {best[n]['prompts_per_s']:.2f} | {best[n]['train_steps_per_s']:.2f} |")
    print(f"scaling efficiency: data {best['efficiency_prompts_per_s']:.0%}, "
          f"training {best['efficiency_train_steps_per_s']:.0%}")
    result = {"machine": machine(), "backend": args.backend, "load_average": os.getloadavg(), "runs": runs,
              "best": {str(k): v for k, v in best.items()},
              "settings": {"prompts": PROMPTS, "new_tokens": NEW_TOKENS, "gen_batch": GEN_BATCH, "steps": STEPS}}
    write_file(target, json.dumps(result, indent=2))
    print(f"saved {target}")


if __name__ == "__main__":
    main()
