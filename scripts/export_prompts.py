"""Export ShareGPT first turns (and MT-Bench questions) as gzipped JSONL for a machine without the
packages, e.g. the lent GPU:  python scripts/export_prompts.py --out .device/data --limit 8000"""

import argparse
import gzip
import json
from pathlib import Path

from mlx_redrafter.data import mt_bench_prompts, sharegpt_conversations


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=8000)
    p.add_argument("--max-chars", type=int, default=2000)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": c.prompt[: args.max_chars], "response": (c.reference or "")[: args.max_chars]}
            for c in sharegpt_conversations(args.limit)]
    with gzip.open(args.out / "sharegpt.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (args.out / "mt_bench.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in mt_bench_prompts()))
    print(f"{len(rows)} ShareGPT prompts and 80 MT-Bench questions in {args.out}")


if __name__ == "__main__":
    main()
