"""Make a distillation data directory holding the first K shards of a larger one, for the data-size
curve (issue 15): `train --data OUT --num-prompts N` then uses it as if it had generated those N prompts.
    python scripts/data_subset.py --data work/data-sampled --shards 5 --prompts sharegpt.jsonl.gz --out work/data-5
The directory may be unfinished (a data run stopped part way): its shards from the first up to a gap count.
The shards are hard-linked (copied across file systems); the manifest is the one a run with
`--num-prompts N --all-turns` on the same prompt file and settings would write, so train checks it as usual."""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from mlx_redrafter.data import conversations
from mlx_redrafter.distill import SHARD_NAME, DataConfig, data_manifest, shard_size
from mlx_redrafter.validate import read_json_object


def leading_shards(data_dir: Path):
    """shard-00000.npz, shard-00001.npz, ... up to the first one missing: an unfinished run's shards count too."""
    present = {p.name for p in data_dir.glob("shard-*.npz") if SHARD_NAME.fullmatch(p.name)}  # not a .tmp.npz
    shards = []
    while f"shard-{len(shards):05d}.npz" in present:
        shards.append(data_dir / f"shard-{len(shards):05d}.npz")
    return shards


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a data directory, finished or not (its first shards)")
    p.add_argument("--shards", type=int, required=True, help="how many of its first shards to keep")
    p.add_argument("--prompts", type=Path, required=True, help="the prompt file the data was made from")
    p.add_argument("--out", type=Path, required=True, help="a new directory")
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists: name a new directory")
    shards = leading_shards(args.data)
    if not shards:
        raise SystemExit(f"error: no shard-00000.npz in {args.data}: name a distillation data directory")
    if not 1 <= args.shards <= len(shards):
        raise SystemExit(f"error: --shards must be 1..{len(shards)} ({args.data} holds shards 0..{len(shards) - 1} "
                         f"without a gap), got {args.shards}")
    shards = shards[: args.shards]
    old = read_json_object(args.data / "manifest.json", "a data manifest", "use another --data directory")
    try:
        cfg = DataConfig(**old["config"])
    except (KeyError, TypeError, ValueError):
        raise SystemExit(f"error: {args.data / 'manifest.json'} is not a data manifest: use another --data directory") from None
    convs = conversations(args.prompts, int(old["prompts"]), all_turns=True)
    made = data_manifest(cfg, convs)
    if {k: old.get(k) for k in made} != made:
        raise SystemExit(f"error: {args.data} was not made from {args.prompts} with --all-turns: pass the prompt file it was made from")
    n = min(len(shards) * shard_size(cfg), len(convs))
    recorded = {}  # every rank's manifest: under mlx.launch each rank writes its own shards
    for rank_file in sorted(args.data.glob("manifest-rank-*.json")):
        recorded.update(read_json_object(rank_file, "a rank manifest", "use another --data directory")["shards"])
    unlisted = [s.name for s in shards if s.name not in recorded]
    if unlisted:  # a run stopped between writing a shard and listing it, or another machine's rank manifest
        raise SystemExit(f"error: {args.data} has {unlisted[0]} but no manifest-rank-*.json lists it: "
                         f"pass fewer --shards, or copy the rank manifests that list it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.partial.", dir=args.out.parent))  # ours alone
    try:
        for s in shards:
            try:
                os.link(s, tmp / s.name)
            except OSError:
                shutil.copy2(s, tmp / s.name)
        kept = {s.name: recorded[s.name] for s in shards}
        (tmp / "manifest-rank-00000.json").write_text(json.dumps({"rank": 0, "ranks": 1, "shards": kept}, indent=2))
        (tmp / "manifest.json").write_text(json.dumps(data_manifest(cfg, convs[:n]), indent=2))
        tmp.rename(args.out)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = sum(v["tokens"] for v in kept.values())
    print(f"{args.out}: {len(shards)} shards, {n} prompts, {tokens} tokens (prompt + response)")


if __name__ == "__main__":
    main()
