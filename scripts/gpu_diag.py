"""Compare this project's model with mlx-lm's on the same weights, per dtype, on this device."""
import mlx_redrafter  # noqa: F401
import mlx.core as mx
from mlx_lm.generate import stream_generate as lm_stream
from mlx_redrafter import generate, load
from mlx_redrafter.generate import encode_prompt
from mlx_redrafter.reference import to_mlx_lm

for dtype in ("float32", "bfloat16", "float16"):
    model, tok, config = load(drafter=None, return_config=True, dtype=dtype)
    ref = to_mlx_lm(model, config)
    ids = encode_prompt(tok, "What is the capital of France?")
    ours = model.logits(model(mx.array([ids])))
    theirs = ref(mx.array([ids]))
    ours_text = generate(model, tok, ids, max_tokens=16)
    lm_text = "".join(r.text for r in lm_stream(ref, tok, mx.array(ids), max_tokens=16))
    print(dtype, "max |logit diff|", mx.abs(ours.astype(mx.float32) - theirs.astype(mx.float32)).max().item())
    print("  ours  :", repr(ours_text))
    print("  mlx-lm:", repr(lm_text))
