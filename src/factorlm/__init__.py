"""factorlm: make transformer language models smaller and faster by pruning + low-rank factorization."""

__version__ = "0.1.0"

from .errors import FactorLMError  # noqa: E402
from .models.io import load, save  # noqa: E402
from .config import RunConfig  # noqa: E402
from .api import compress, evaluate_model, finetune, info  # noqa: E402

__all__ = ["FactorLMError", "RunConfig", "compress", "evaluate_model", "finetune", "info", "load", "save", "__version__"]
