"""MLX CUDA launch settings side by side: `tree_modes.py` once per environment, each in a fresh process
(MLX reads these variables once, at start-up), so every row is mlx-lm plain against ReDrafter interleaved
under the same setting.

MLX's CUDA backend records kernels into a CUDA graph and launches it every `MLX_MAX_OPS_PER_BUFFER`
operations (default 20); `MLX_USE_CUDA_GRAPHS=0` launches each kernel directly. A 135M model's token
is a few milliseconds of launches, so how they are grouped can move both plain decoding and a step.

    python benchmarks/cuda_env.py --out-dir results/cuda-env \
        --env default= --env ops100=MLX_MAX_OPS_PER_BUFFER=100 --env nographs=MLX_USE_CUDA_GRAPHS=0 \
        -- --model M --prompts P --every 10 --max-tokens 128 --settings ranked:32x6:32

Each `--env` is NAME=[VAR=VALUE[;VAR=VALUE...]]; the arguments after `--` go to `tree_modes.py`.
Writes OUT_DIR/NAME.json per setting and OUT_DIR/summary.json.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mlx_redrafter.outputs import write_file

HERE = Path(__file__).resolve().parent


def parse_env(spec: str) -> tuple[str, dict]:
    """NAME=VAR=VALUE;VAR=VALUE -> (NAME, {VAR: VALUE}); NAME= is the unchanged environment."""
    name, eq, rest = spec.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise SystemExit(f"error: --env takes NAME=[VAR=VALUE;...] with NAME of letters, digits, '.', '_', '-'; got {spec!r}")
    pairs = [p.partition("=") for p in rest.split(";") if p]
    if any(not var or not sep for var, sep, _ in pairs):
        raise SystemExit(f"error: --env {spec!r}: each setting is VAR=VALUE")
    return name, {var: value for var, _, value in pairs}


def run_one(name: str, env: dict, out: Path, tree_args: list[str]) -> dict:
    """One tree_modes.py process under `env`; its rows (or the error it stopped with)."""
    start = time.perf_counter()
    cmd = [sys.executable, str(HERE / "tree_modes.py"), *tree_args, "--out", str(out)]
    done = subprocess.run(cmd, env=os.environ | env)
    row = {"env": env, "seconds": round(time.perf_counter() - start, 1), "returncode": done.returncode}
    if out.exists():
        row |= {k: v for k, v in json.loads(out.read_text()).items() if k in ("rows", "prompts", "machine")}
    return row


def main():
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--env", action="append", required=True, help="NAME=[VAR=VALUE;...], repeatable")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv[:split])
    settings = [parse_env(s) for s in args.env]
    names = [n for n, _ in settings]
    if len(set(names)) != len(names):
        raise SystemExit("error: each --env needs its own NAME")
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot use --out-dir {args.out_dir}: {e.strerror}")
    clash = [n for n in names if (args.out_dir / f"{n}.json").exists()]
    if clash or (args.out_dir / "summary.json").exists():
        raise SystemExit(f"error: {args.out_dir} already holds results ({', '.join(clash) or 'summary.json'}); pass another --out-dir")
    summary = {}
    try:
        for name, env in settings:
            print(f"== {name}: {env or 'unchanged environment'}", flush=True)
            row = run_one(name, env, args.out_dir / f"{name}.json", argv[split + 1:])
            if row["returncode"] != 0:  # the same arguments would fail under every setting
                raise SystemExit(f"error: tree_modes.py stopped with status {row['returncode']} under --env {name} (above); "
                                 f"settings measured before it are in {args.out_dir}")
            summary[name] = row
            write_file(args.out_dir / "summary.json", json.dumps(summary, indent=2))
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; settings measured so far are in {args.out_dir}")
    for name, row in summary.items():
        for setting, r in row.get("rows", {}).items():
            print(f"{name:10s} {setting:32s} {r['median_tps']:8.1f} tok/s {r['speedup']:6.2f}x")


if __name__ == "__main__":
    main()
