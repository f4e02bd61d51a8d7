"""mlx-lm's own model with this project's weights: the reference for parity tests and benchmarks."""

import mlx.nn as nn
from mlx_lm.utils import _get_classes

from .llama import mlx_lm_quantization, mlx_lm_weights, quantize_like


def to_mlx_lm(model, config: dict) -> nn.Module:
    """An mlx-lm model of the same architecture holding the same weights (shared, not copied)."""
    config = {**config, **{k: v for k, v in model.args.__dict__.items() if k != "extra" and v is not None}}
    config.pop("quantization", None)
    model_class, args_class = _get_classes(config)
    ref = model_class(args_class.from_dict(config))
    quantize_like(ref, mlx_lm_quantization(model))
    ref.load_weights(list(mlx_lm_weights(model).items()), strict=True)
    return ref
