"""mlx-redrafter: lossless Recurrent Drafter speculative decoding on MLX.

Three lines to a fast answer, in mlx-lm's shapes:

    import mlx_redrafter as mr
    model, tokenizer = mr.load()               # the default model, with its drafter as model.drafter
    print(mr.generate(model, tokenizer, "Name three rivers.", max_tokens=64))

`load`, `generate` and `stream_generate` take mlx-lm's arguments (`max_tokens`,
`verbose`, `temp`, `top_p`, `top_k`, `return_config`); `drafter=None` or
`speculative=False` decodes plainly. The rest of the public API: `BeamShape`,
`default_shape`, `SamplingConfig`, `load_drafter`, `find_drafter`, `Drafter`,
`Decoder`, `GenerationResponse`, `PromptCache`.
"""

from .backend import preload_blas

preload_blas()  # must run before mlx is first imported

__version__ = "0.1.0"

from .loading import find_drafter, load  # noqa: E402
from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .sampling import SamplingConfig  # noqa: E402
from .beam_search import BeamShape, default_shape  # noqa: E402
from .drafter import Drafter, load_drafter  # noqa: E402
from .decoding import Decoder  # noqa: E402
from .prompt_cache import PromptCache  # noqa: E402

__all__ = [
    "load", "generate", "stream_generate", "GenerationResponse", "SamplingConfig",
    "BeamShape", "default_shape", "load_drafter", "find_drafter", "Drafter", "Decoder", "PromptCache",
    "__version__",
]
