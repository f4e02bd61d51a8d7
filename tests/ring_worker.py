"""One rank of tests/test_distributed.py: tiny distillation data, then tiny training, over mx.distributed.

    python ring_worker.py DATA OUT [--interrupt-at STEP]

With --interrupt-at, training is stopped by Ctrl-C at that step and then resumed (rank 0
reads the checkpoint, every rank gets its weights), in the same processes to keep the test short.

Started once per rank with MLX_RANK and MLX_HOSTFILE set as `mlx.launch --backend ring` sets them.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_redrafter  # noqa: F401,E402  (before mlx: the fast BLAS)
import mlx.core as mx  # noqa: E402

from conftest import tiny_config, tiny_model, word_tokenizer  # noqa: E402
from mlx_redrafter import training  # noqa: E402
from mlx_redrafter.data import Conversation  # noqa: E402
from mlx_redrafter.distill import DataConfig, make_distillation_data, read_sequences  # noqa: E402
from mlx_redrafter.distributed import world  # noqa: E402

VOCAB = 24
DATA = DataConfig(max_new_tokens=12, batch_size=4, shard_size=8)
TRAIN = training.TrainConfig(head="full", exit_dim=32, num_draft_layers=1, batch_size=8, epochs=2, checkpoint_every=3,
                             seq_len=64, unroll=3)


def base_model():
    return tiny_model(tiny_config(vocab_size=VOCAB), seed=3, scale=2.0)


def conversations(n=40):
    rng = __import__("numpy").random.default_rng(0)
    return [Conversation(" ".join(f"t{i}" for i in rng.integers(2, VOCAB, 5))) for _ in range(n)]


def interrupt_at(step: int):
    """Ctrl-C on every rank when the global batch `step` (0-based) comes up."""
    real, seen = training.batches, [0]

    def batches(examples, cfg, epoch):
        for rows in real(examples, cfg, epoch):
            if seen[0] == step:
                raise KeyboardInterrupt
            seen[0] += 1
            yield rows

    training.batches = batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--interrupt-at", type=int)
    args = parser.parse_args()
    group = world()
    base = base_model()
    make_distillation_data(base, word_tokenizer(VOCAB, eos=1), conversations(), args.data, DATA, progress=False)
    examples = read_sequences(args.data)
    if args.interrupt_at is not None:
        real = training.batches
        interrupt_at(args.interrupt_at)
        try:
            training.fit(base, examples, args.out, TRAIN, progress=False)
        except KeyboardInterrupt:
            print(f"rank {group.rank} interrupted", flush=True)
        training.batches = real
    training.fit(base, examples, args.out, TRAIN, resume=args.interrupt_at is not None, progress=False,
                   save_dtype=mx.float32)
    print(f"rank {group.rank} of {group.size} done", flush=True)


if __name__ == "__main__":
    main()
