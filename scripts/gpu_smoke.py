"""Quick check on a new machine: greedy equality with a random drafter, batched generation,
and the time of one training step per drafter head (to plan a training run)."""

import time

import mlx_redrafter  # noqa: F401
import mlx.core as mx
import numpy as np

from mlx_redrafter import generate, load
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter.distill import batch_generate
from mlx_redrafter.drafter import DrafterConfig, init_drafter
from mlx_redrafter.generate import encode_prompt
from mlx_redrafter.sampling import SamplingConfig
from mlx_redrafter.training import TrainConfig, fit

model, tok = load(drafter=None)  # plain first; a random drafter below
print("device", mx.default_device(), "dtype", model.model.norm.weight.dtype)
d = init_drafter(DrafterConfig(49152, 576, 576, 1, shared_lm_head=True), model)
p = "Explain photosynthesis briefly."
t = time.perf_counter()
a = generate(model, tok, p, max_tokens=64)
b = generate(model, tok, p, max_tokens=64, drafter=d, beam=BeamShape(4, 5))
print("greedy equal with random drafter:", a == b, f"{time.perf_counter() - t:.1f}s")
ids = [encode_prompt(tok, q) for q in ["Hi!", "Name a fruit.", "What is 2+2?", p]]
t = time.perf_counter()
outs = batch_generate(model, ids, 64, SamplingConfig(), set(tok.eos_token_ids))
single = [generate(model, tok, i, max_tokens=64) for i in ids]
print("batched == single:", [tok.decode(o[:-1] if o and o[-1] in tok.eos_token_ids else o) == s for o, s in zip(outs, single)],
      f"{time.perf_counter() - t:.1f}s")
rng = np.random.default_rng(0)
examples = [(rng.integers(0, 49152, 600).astype(np.int32), 100) for _ in range(64)]
for head in ("shared", "reduced", "full"):
    cfg = TrainConfig(head=head, batch_size=16, epochs=1, max_steps=4, checkpoint_every=100)
    t = time.perf_counter()
    _, m = fit(model, examples, f"/tmp/smoke-{head}", cfg, progress=False)
    print(f"train head={head}: {(time.perf_counter() - t) / 4:.3f} s/step (batch 16 x 640, incl. compile)")
