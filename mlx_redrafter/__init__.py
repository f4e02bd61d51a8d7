"""mlx-redrafter: lossless Recurrent Drafter speculative decoding on MLX.

Three lines to a fast answer, in mlx-lm's shapes:

    import mlx_redrafter as mr
    model, tokenizer = mr.load()               # the default model, with its drafter as model.drafter
    print(mr.generate(model, tokenizer, "Name three rivers.", max_tokens=64))

`load`, `generate` and `stream_generate` take mlx-lm's arguments (`max_tokens`,
`verbose`, `temp`, `top_p`, `top_k`, `return_config`); `drafter=None` or
`speculative=False` decodes plainly. Training, evaluation and speed from Python
(each returns a result with the numbers the command line prints, and `.plot()`):

    run = mr.train("runs/mine", model, tokenizer, prompts=[...], max_steps=100)   # a drafter
    mr.eval_drafter(model, tokenizer, prompts=[...], widths=[4], lengths=[4])   # tokens per step
    mr.benchmark(model, tokenizer, prompts=[...], max_tokens=64)               # speed vs mlx-lm

The rest of the public API: `BeamShape`, `default_shape`, `SamplingConfig`,
`load_drafter`, `find_drafter`, `Drafter`, `Decoder`, `GenerationResponse`,
`TrainConfig` and the result classes, `PromptCache`.
"""

from .backend import preload_blas

preload_blas()  # must run before mlx is first imported

__version__ = "0.1.0"

from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .sampling import SamplingConfig  # noqa: E402
from .beam_search import BeamShape, default_shape  # noqa: E402
from .drafter import Drafter, load_drafter  # noqa: E402
from .decoding import Decoder  # noqa: E402
from .prompt_cache import PromptCache  # noqa: E402

# imported on first use: these pull in mlx-lm and with it transformers (and torch where installed),
# seconds that `--help`, and a Ctrl-C during start-up, should not wait for
_LAZY = {"load": "loading", "find_drafter": "loading", "train": "training", "TrainConfig": "training",
         "TrainResult": "training", "eval_drafter": "evaluate", "EvalResult": "evaluate",
         "benchmark": "speed", "BenchmarkResult": "speed", "sample_prompts": "self_prompts"}


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("_") and "." not in name and importlib.util.find_spec(f".{name}", __name__):
        # a submodule: mr.loading, ... (never __main__, which would run the command line)
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "load", "generate", "stream_generate", "GenerationResponse", "SamplingConfig",
    "BeamShape", "default_shape", "load_drafter", "find_drafter", "Drafter", "Decoder", "PromptCache",
    "train", "TrainConfig", "TrainResult", "sample_prompts", "eval_drafter", "EvalResult", "benchmark", "BenchmarkResult",
    "__version__",
]
