"""factorlm: make transformer language models smaller and faster by pruning + low-rank factorization."""

__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao when it is installed; torchao then logs that its optional CUDA kernels do not
# load on a CPU build of torch (and torch's pytree a deprecation): noise on every command, unless the
# user configured these loggers
for _name in ("torchao", "torch.utils._pytree"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.ERROR)

from .errors import FactorLMError  # noqa: E402
from .models.io import load, save  # noqa: E402
from .config import RunConfig  # noqa: E402
from .api import compress, evaluate_model, finetune, info  # noqa: E402

__all__ = ["FactorLMError", "RunConfig", "compress", "evaluate_model", "finetune", "info", "load", "save", "__version__"]
