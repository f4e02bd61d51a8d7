"""Export ShareGPT conversations (and MT-Bench questions) as gzipped JSONL for a machine without the
packages, e.g. the lent GPU:  python scripts/export_prompts.py --out .device/data
Each record keeps a conversation's turns (each cut to --max-chars) up to its last user turn with a
reply, so `mlx-redrafter train --all-turns` can use every user turn as a prompt."""

import argparse
import gzip
import itertools
import json
from pathlib import Path

from mlx_redrafter.data import mt_bench_prompts, sharegpt_conversations


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="most prompts (user turns)")
    p.add_argument("--max-chars", type=int, default=2000)
    p.add_argument("--skip-turns", type=int, default=0,
                   help="leave out the conversations holding the first N user turns (N on a conversation's end) and "
                        "write sharegpt-rest.jsonl.gz: the prompts a data run of --num-prompts N did not reach")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cut = lambda text: (text or "")[: args.max_chars]  # noqa: E731
    convs = sharegpt_conversations(args.limit, all_turns=True)
    # a conversation is exported once, at its last turn (history + prompt + reply hold all turns before)
    last = [c for i, c in enumerate(convs) if i + 1 == len(convs) or len(convs[i + 1].history) == 0]
    if args.skip_turns:
        ends = list(itertools.accumulate(len(c.history) + 1 for c in last))  # user turns up to each conversation's end
        if args.skip_turns not in ends:
            raise SystemExit(f"error: turn {args.skip_turns} does not end a conversation: pick the turn count a data run covered")
        last = last[ends.index(args.skip_turns) + 1:]
        if not last:
            raise SystemExit(f"error: the first {args.skip_turns} turns are all of them: nothing is left to export")
    name = "sharegpt-rest.jsonl.gz" if args.skip_turns else "sharegpt.jsonl.gz"
    with gzip.open(args.out / name, "wt", encoding="utf-8") as f:
        for c in last:
            turns = [m for u, a in c.history for m in ({"from": "human", "value": cut(u)}, {"from": "gpt", "value": cut(a)})]
            turns += [{"from": "human", "value": cut(c.prompt)}, {"from": "gpt", "value": cut(c.reference)}]
            f.write(json.dumps({"conversations": turns}) + "\n")
    (args.out / "mt_bench.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in mt_bench_prompts()))
    turns = sum(len(c.history) + 1 for c in last)
    print(f"{len(last)} ShareGPT conversations ({turns} user turns) in {args.out / name}, 80 MT-Bench questions")


if __name__ == "__main__":
    main()
