"""mlx-redrafter: lossless Recurrent Drafter speculative decoding on MLX."""

from .backend import preload_blas

preload_blas()  # must run before mlx is first imported

__version__ = "0.1.0"

from .loading import load  # noqa: E402
from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .sampling import SamplingConfig  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "SamplingConfig", "__version__"]
