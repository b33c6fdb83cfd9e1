"""Save and load factorized models as plain folders (no pickle, no remote code, no network).

A folder holds the HF ``config.json``, the tokenizer files, ``model.safetensors`` (the state dict:
factor weights under the original module names, e.g. ``...query.A`` / ``...query.B``) and
``factorlm.json``: the model class, one entry per replaced module (``structure``, ``shape``, plus the
structure's parameters such as ``rank``), the method, the full recipe, library versions and scores.
:func:`load` rebuilds the architecture from the config, swaps in empty structures from those specs
and loads the tensors strictly, so logits are bit-identical to the saved model's.

Writes are atomic: everything goes to a hidden temporary sibling folder that is renamed into
place only when complete, so an interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import FactorLMError
from ..layers.base import FactorizedLinear, structure_from_spec
from .loading import FACTORLM_JSON, read_meta
from .surgery import factorized_modules, set_module

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("factorlm", "torch", "transformers", "accelerate", "safetensors", "numpy", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def check_finite(model: nn.Module, what: str = "model") -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise FactorLMError(f"{what} has non-finite values (NaN/Inf) in {name}")


def module_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: m.spec() for name, m in factorized_modules(model).items()}


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out_dir`` only if the block finishes without error."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FactorLMError(f"output folder {out} already exists and is not empty (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (dense or factorized) to ``out_dir`` atomically; returns the folder.

    ``extra_files``: ``{relative name: bytes | str | callable(path)}`` written into the folder too
    (e.g. plots, pruning masks) so they appear atomically with the weights.
    """
    from safetensors.torch import save_model

    check_finite(model)
    for name, m in factorized_modules(model).items():
        if type(m).from_spec is FactorizedLinear.from_spec:  # e.g. a training-only wrapper
            raise FactorLMError(f"module {name} ({type(m).__name__}) cannot be saved; finalize the method first")
    info = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "modules": module_specs(model),
        **(meta or {}),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / FACTORLM_JSON).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
        for rel, content in (extra_files or {}).items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(dst)
            elif isinstance(content, bytes):
                dst.write_bytes(content)
            else:
                dst.write_text(str(content))
    return Path(out_dir).expanduser().resolve()


def _json_default(o):
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise FactorLMError(f"unknown model class {name!r} in {FACTORLM_JSON} (transformers {transformers.__version__})")
    return cls


def load(path: str | os.PathLike, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` and return the transformers model in eval mode."""
    from safetensors.torch import load_model
    from transformers import AutoConfig

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FactorLMError(f"model folder does not exist: {path}")
    meta = read_meta(str(p))
    if meta is None or not (p / WEIGHTS_NAME).is_file():
        raise FactorLMError(f"{path} is not a factorlm model folder (needs {FACTORLM_JSON} and {WEIGHTS_NAME})")
    try:
        config = AutoConfig.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - any config problem is the user's folder
        raise FactorLMError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}") from None
    cls = _model_class(meta.get("model_class", ""))
    model = cls(config)
    for name, spec in meta.get("modules", {}).items():
        try:
            set_module(model, name, structure_from_spec(spec))
        except AttributeError:
            raise FactorLMError(f"{FACTORLM_JSON} names module {name} which {cls.__name__} does not have") from None
    try:
        missing, unexpected = load_model(model, str(p / WEIGHTS_NAME), strict=False)
    except Exception as e:  # noqa: BLE001
        raise FactorLMError(f"cannot load {p / WEIGHTS_NAME}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise FactorLMError(
            f"{p / WEIGHTS_NAME} does not match {FACTORLM_JSON}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    check_finite(model, f"model in {path}")
    return model.eval()
