"""What makes a factorlm folder load correctly in plain transformers, or fail loudly: the config's
``auto_map`` + ``modeling_factorlm.py`` (:mod:`factorlm.models.hf_remote`, copied as is) and a
model card.

A folder with factorized layers gets ``model_type: "factorlm"`` (the original in
``factorlm_base_model_type``, every other field unchanged), so ``AutoModel*.from_pretrained(folder)``
without ``trust_remote_code=True`` raises transformers' "contains custom code" error instead of
building the original architecture with random layers where the factors are; with it, the shipped
file rebuilds the original class with the saved factors.  A folder without factorized layers (a dense
export) keeps its standard config.  :func:`read_config` is the inverse used by :func:`factorlm.load`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import hf_remote

MODELING_FILE = "modeling_factorlm.py"
_ENTRY = f"{Path(MODELING_FILE).stem}.{hf_remote.FactorLMModel.__name__}"
# (Auto class, transformers' mapping of model type -> class name) for the heads factorlm saves
_AUTO = [("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
         ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),  # multimodal wrappers
         ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
         ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
         ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
         ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
         ("AutoModel", "MODEL_MAPPING_NAMES")]


def auto_classes(model_type: str, class_name: str) -> list[str]:
    """The ``AutoModel...`` classes whose mapping gives ``class_name`` for ``model_type``
    (``AutoModel`` when none does, e.g. a class transformers maps nowhere)."""
    from transformers.models.auto import modeling_auto

    found = [auto for auto, mapping in _AUTO if getattr(modeling_auto, mapping, {}).get(model_type) == class_name]
    return found or ["AutoModel"]


def remote_config(config_dict: dict[str, Any], class_name: str) -> dict[str, Any]:
    """``config.json`` for a folder with factorized layers (see the module docstring)."""
    base_type = config_dict["model_type"]
    auto = {"AutoConfig": f"{Path(MODELING_FILE).stem}.{hf_remote.FactorLMConfig.__name__}",
            **{a: _ENTRY for a in auto_classes(base_type, class_name)}}
    return {**config_dict, "model_type": hf_remote.MODEL_TYPE, hf_remote.BASE_KEY: base_type,
            "architectures": [class_name], "auto_map": auto}


def write(folder: Path, config, class_name: str) -> None:
    """``config.json`` + ``modeling_factorlm.py`` into ``folder`` (written by :func:`factorlm.models.save`)."""
    d = remote_config(config.to_dict(), class_name)
    (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    (folder / MODELING_FILE).write_text(Path(hf_remote.__file__).read_text())


def read_config(folder: str | Path):
    """The original architecture's config of a factorlm folder, whichever config.json it has."""
    from transformers import AutoConfig

    p = Path(folder) / "config.json"
    d = json.loads(p.read_text())
    if d.get("model_type") == hf_remote.MODEL_TYPE:
        return hf_remote.base_config(d)
    return AutoConfig.from_pretrained(str(folder))


def _fmt(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(meta: dict[str, Any], class_name: str, auto: list[str]) -> str:
    """A README.md: source, recipe, budget, scores and how to load the folder."""
    recipe = meta.get("recipe") or {}
    acc = meta.get("accounting") or {}
    scores = meta.get("scores") or {}
    lines = [
        "---", "library_name: transformers", "tags: [factorlm, low-rank, compression]", "---", "",
        f"# {class_name}, compressed by factorlm", "",
        f"Source: `{meta.get('base_model') or recipe.get('model') or '?'}`. Method `{meta.get('method', '?')}`"
        f" ({meta.get('structure', 'lowrank')}), task `{meta.get('task', '?')}`, saved in {meta.get('dtype', '?')}.", "",
    ]
    if acc:
        lines += ["| budget | value |", "|---|---|"]
        for k in ("target_weights_before", "target_weights_after", "target_ratio", "model_params_before",
                  "model_params_after", "bytes_before", "bytes_on_disk"):
            if k in acc:
                lines.append(f"| {k} | {_fmt(acc[k])} |")
        lines.append("")
    known = ("perplexity", "accuracy", "f1", "pearson", "spearmanr", "exact_match", "matthews_correlation")
    metrics = [m for m in known if any(isinstance(s, dict) and isinstance(s.get(m), (int, float)) for s in scores.values())]
    if metrics:
        lines += ["| stage | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for stage, s in scores.items():
            if isinstance(s, dict):
                lines.append(f"| {stage} | " + " | ".join(_fmt(s.get(m, "")) for m in metrics) + " |")
        lines.append("")
    lines += [
        "## Load", "", "```python",
        f"from transformers import {auto[0]}, AutoTokenizer",
        f"model = {auto[0]}.from_pretrained(PATH, trust_remote_code=True)  # modeling_factorlm.py: the factorized layers",
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
        "# or, with factorlm installed: import factorlm; model = factorlm.load(PATH)", "```", "",
        "Without `trust_remote_code=True` transformers refuses this folder (its `model_type` is `factorlm`)",
        "rather than loading the original architecture with random layers where the factors are.",
        "Serving: the vLLM Transformers backend accepts remote-code models; llama.cpp and other converters",
        "need a dense folder: `factorlm export PATH --format hf --output DENSE`.", "",
        "## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True, default=str), "```", "",
    ]
    return "\n".join(lines)


def tokenizer_kwargs(folder: str | Path) -> dict[str, Any]:
    """Extra arguments for ``AutoTokenizer.from_pretrained(folder)``: a factorlm folder's base config,
    so transformers does not read the remote-code config (and ask whether to trust it)."""
    p = Path(folder) / "config.json"
    try:
        is_ours = p.is_file() and json.loads(p.read_text()).get("model_type") == hf_remote.MODEL_TYPE
    except (OSError, ValueError):
        return {}
    return {"config": read_config(folder)} if is_ours else {}
