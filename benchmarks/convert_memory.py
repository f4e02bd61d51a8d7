"""Peak memory of `convert base` on a multi-shard PyTorch checkpoint, against its total size.

    python benchmarks/convert_memory.py [--layers 16] [--hidden 1024] [--shards 8]

Writes a random Llama checkpoint as pytorch_model-0000k-of-0000n.bin shards,
converts it in a child process, and reports the child's peak RSS
(results/convert_memory.json). Needs torch.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_checkpoint(path: Path, layers: int, hidden: int, shards: int) -> int:
    import torch

    config = dict(model_type="llama", hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=32000,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=2048)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (32000, hidden), "lm_head.weight": (32000, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        for n, s in (("gate_proj", (3 * hidden, hidden)), ("up_proj", (3 * hidden, hidden)), ("down_proj", (hidden, 3 * hidden))):
            shapes[p + f"mlp.{n}.weight"] = s
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    weight_map, total = {}, 0
    for k, part in enumerate(np.array_split(sorted(shapes), shards)):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        tensors = {str(n): torch.randn(*shapes[n]) * 0.02 for n in part}
        torch.save(tensors, path / name)
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({str(n): name for n in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--out", default="results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        total = write_checkpoint(src, args.layers, args.hidden, args.shards)
        largest = max(f.stat().st_size for f in src.glob("*.bin"))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mlx_redrafter", "convert", "base", str(src), str(Path(tmp) / "out"),
                        "--dtype", "float32"], check=True)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    record = {"checkpoint_bytes": total, "shards": args.shards, "largest_shard_bytes": largest,
              "convert_peak_rss_bytes": peak, "seconds": round(seconds, 1)}
    print(f"checkpoint {total / 1e6:.0f} MB in {args.shards} shards (largest {largest / 1e6:.0f} MB): "
          f"convert peak RSS {peak / 1e6:.0f} MB, {seconds:.1f} s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "convert_memory.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
