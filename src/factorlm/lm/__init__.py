"""``--task lm``: one-shot low-rank compression of causal language models, one stage per module.

=================  ==========================================================================
:mod:`.load`       resolve and load the model (folder, hub id, GGUF, ``smollm2``) in its dtype
:mod:`.calibrate`  stream calibration windows through the decoder blocks, one block at a time
:mod:`.methods`    the one-shot methods (``svd``, ``asvd``, ``whiten``): their input scaling
:mod:`.plan`       rank plans (fixed, uniform, global over the scaled spectra)
:mod:`.factorize`  replace every target by its factors (maths in :mod:`factorlm.decompose.whiten`)
:mod:`.heal`       optional fine-tuning of the factors (next-token loss or KL to the dense layers)
:mod:`.evaluate`   perplexity (:mod:`.perplexity`), samples, FLOPs, generation speed (:mod:`.speed`)
:mod:`.save`       save first, then add what is measured afterwards
:mod:`.pipeline`   :func:`compress_lm` and :func:`evaluate_lm`, the orchestration of the stages
=================  ==========================================================================
"""

from .calibrate import decoder_blocks, stream, token_batches
from .gradients import output_grams, output_sensitivity
from .evaluate import greedy_sample
from .factorize import factorize
from .heal import DenseTeacher, heal
from .load import SMOLLM2, load_causal_lm, resolve_causal_model
from .methods import LM_METHODS, get_lm_method
from .perplexity import perplexity
from .pipeline import check_config, compress_lm, evaluate_lm
from .plan import plan_ranks, spectra

__all__ = [
    "DenseTeacher", "LM_METHODS", "SMOLLM2", "check_config", "compress_lm", "decoder_blocks", "evaluate_lm",
    "factorize", "get_lm_method", "greedy_sample", "heal", "load_causal_lm", "output_grams", "output_sensitivity", "perplexity",
    "plan_ranks", "resolve_causal_model", "spectra", "stream", "token_batches",
]
