"""Make a distillation data directory holding the first K shards of a larger one, for the data-size
curve (issue 15): `train --data OUT --num-prompts N` then uses it as if it had generated those N prompts.
    python scripts/data_subset.py --data work/data-sampled --shards 5 --prompts sharegpt.jsonl.gz --out work/data-5
The shards are hard-linked (copied across file systems); the manifest is the one a run with
`--num-prompts N --all-turns` on the same prompt file and settings would write, so train checks it as usual."""

import argparse
import json
import os
import shutil
from pathlib import Path

from mlx_redrafter.data import conversations
from mlx_redrafter.distill import DataConfig, _fingerprint, complete_shards, shard_size


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a finished data directory")
    p.add_argument("--shards", type=int, required=True, help="how many of its first shards to keep")
    p.add_argument("--prompts", type=Path, required=True, help="the prompt file the data was made from")
    p.add_argument("--out", type=Path, required=True, help="a new directory")
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists: name a new directory")
    shards = complete_shards(args.data)[: args.shards]
    manifest = json.loads((args.data / "manifest.json").read_text())
    size = shard_size(DataConfig(**manifest["config"]))
    n = min(len(shards) * size, int(manifest["prompts"]))
    convs = conversations(args.prompts, n, all_turns=True)[:n]
    args.out.mkdir(parents=True)
    for s in shards:
        try:
            os.link(s, args.out / s.name)
        except OSError:
            shutil.copy2(s, args.out / s.name)
    rank = json.loads((args.data / "manifest-rank-00000.json").read_text())
    rank["shards"] = {s.name: rank["shards"][s.name] for s in shards}
    (args.out / "manifest-rank-00000.json").write_text(json.dumps(rank, indent=2))
    manifest.update(prompts=n, fingerprint=_fingerprint(convs))
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tokens = sum(v["tokens"] for v in rank["shards"].values())
    print(f"{args.out}: {len(shards)} shards, {n} prompts, {tokens} tokens (prompt + response)")


if __name__ == "__main__":
    main()
