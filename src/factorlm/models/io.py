"""Save and load factorized models as plain folders (no pickle, no network).

A folder holds the HF ``config.json``, the tokenizer files, ``model.safetensors`` (the state dict:
factor weights under the original module names, e.g. ``...query.A`` / ``...query.B``) and
``factorlm.json``: the model class, one entry per replaced module (``structure``, ``shape``, plus the
structure's parameters such as ``rank``), the method, the full recipe, library versions and scores.
The saved ``config.json`` names the class actually saved in ``architectures`` (e.g.
``BertForSequenceClassification``, not the ``BertForMaskedLM`` the source checkpoint came as).  A folder
with factorized layers also gets ``modeling_factorlm.py``, an ``auto_map`` and ``model_type: "factorlm"``
(:mod:`factorlm.models.hub_folder`): plain transformers loads it with ``trust_remote_code=True`` and
refuses it without, rather than building random layers where the factors are; and a model card.
:func:`load` rebuilds the architecture from the config, swaps in empty structures from those specs,
checks the tensor names and shapes in the ``model.safetensors`` header against it (a mismatch is a
one-line :class:`FactorLMError` naming the tensor, the expected and the found shape) and loads the
tensors strictly, so logits are bit-identical to the saved model's.

Writes are atomic: everything goes to a hidden temporary sibling folder that is renamed into
place only when complete, so an interrupted run never leaves a folder that looks finished.  The
finished folder honours the umask like an ordinary ``mkdir`` / ``open``: folders ``0o777 & ~umask``,
files ``0o666 & ~umask`` (the temporary folder itself is created private, ``0o700``).
"""

from __future__ import annotations

import contextlib
import copy
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
from ..profiling import DTYPES  # fp32 / bf16 / fp16 -> torch dtype
from .loading import FACTORLM_JSON, read_meta
from . import hub_folder, weights
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


def current_umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask_modes(root: Path) -> None:
    """Give ``root`` and everything below it the modes a plain ``mkdir`` / ``open`` would have:
    folders ``0o777 & ~umask``, files ``0o666 & ~umask`` (symlinks are left alone).

    ``tempfile.mkdtemp`` makes ``0o700`` folders and safetensors writes ``0o600`` files, which would
    otherwise hide a saved model from the rest of a group that shares it.
    """
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    for here, dirs, files in os.walk(root):
        for f in files:
            fp = os.path.join(here, f)
            if not os.path.islink(fp):
                os.chmod(fp, file_mode)
        for d in dirs:
            dp = os.path.join(here, d)
            if not os.path.islink(dp):
                os.chmod(dp, dir_mode)
    os.chmod(root, dir_mode)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out_dir`` only if the block finishes without error.

    The temporary folder is private (``0o700``) while it is written; just before the rename its
    folders and files get the umask's default modes (:func:`apply_umask_modes`).
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FactorLMError(f"output folder {out} already exists and is not empty (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_umask_modes(tmp)
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
    max_shard_size: int | str = weights.MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` (dense or factorized) to ``out_dir`` atomically; returns the folder.

    ``config.json`` is a copy of ``model.config`` whose ``architectures`` is ``[type(model).__name__]``
    (``model.config`` itself is not changed).  Folder and file modes follow the umask (see
    :func:`atomic_dir`).

    ``extra_files``: ``{relative name: bytes | str | callable(path)}`` written into the folder too
    (e.g. plots, pruning masks) so they appear atomically with the weights.  The weights are
    ``model.safetensors``, or shards with an index past ``max_shard_size`` (:func:`weights.write`),
    in the model's dtype.
    """
    check_finite(model)
    for name, m in factorized_modules(model).items():
        if type(m).from_spec is FactorizedLinear.from_spec:  # e.g. a training-only wrapper
            raise FactorLMError(f"module {name} ({type(m).__name__}) cannot be saved; finalize the method first")
    info = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "modules": module_specs(model),
        **(meta or {}),
        "dtype": model_dtype_name(model),  # what is saved, whatever the caller's metadata says
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    factorized = bool(info["modules"])
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        if factorized:  # loads in plain transformers with trust_remote_code, fails loudly without it
            hub_folder.write(tmp, config, type(model).__name__)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        try:
            weights.write(model, tmp, max_shard_size=max_shard_size)
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk etc. as its own error type
            if isinstance(e, OSError):
                raise
            raise FactorLMError(f"could not write {Path(out_dir) / WEIGHTS_NAME}: "
                                f"{' '.join(str(e).split()) or type(e).__name__}") from None
        (tmp / FACTORLM_JSON).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
        if factorized and "README.md" not in (extra_files or {}):
            auto = hub_folder.auto_classes(model.config.model_type, type(model).__name__)
            card = hub_folder.model_card(json.loads(json.dumps(info, default=_json_default)), type(model).__name__, auto)
            (tmp / "README.md").write_text(card)
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


def model_dtype_name(model: nn.Module) -> str:
    """``fp32`` / ``bf16`` / ``fp16``: the dtype of the model's floating-point parameters."""
    for p in model.parameters():
        if p.is_floating_point():
            return next((k for k, v in DTYPES.items() if v == p.dtype), str(p.dtype))
    return "fp32"


def load(path: str | os.PathLike, *, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` and return the transformers model in eval mode, in the
    dtype it was saved in (``factorlm.json``'s ``dtype``; a bf16 save is half the size), or cast to
    ``dtype`` (a torch dtype or ``"fp32"`` / ``"bf16"`` / ``"fp16"``).

    The model is built on the meta device (``accelerate.init_empty_weights``: no random
    initialisation, no float32 copy) and the saved tensors are assigned to it, cast one by one
    (:func:`weights.load_into`), so a model needs its own size in memory once.  Every problem with
    the folder is a one-line :class:`FactorLMError`: a module spec that cannot be built names its
    module (``factorlm.json: module X: rank must be in [1, 384] ...``), and weights that do not fit
    the rebuilt model name the tensor and both shapes (:func:`weights.check_match`).
    """
    from accelerate import init_empty_weights

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FactorLMError(f"model folder does not exist: {path}")
    meta = read_meta(str(p))
    files = weights.files(p) if meta is not None else []
    if meta is None or not files:
        raise FactorLMError(f"{path} is not a factorlm model folder (needs {FACTORLM_JSON} and {WEIGHTS_NAME} "
                            f"or {weights.INDEX})")
    try:
        config = hub_folder.read_config(p)
    except Exception as e:  # noqa: BLE001 - any config problem is the user's folder
        raise FactorLMError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}") from None
    cls = _model_class(meta.get("model_class", ""))
    specs = meta.get("modules", {})
    if not isinstance(specs, dict):
        raise FactorLMError(f"{FACTORLM_JSON}: 'modules' must be an object of module name -> spec")
    with init_empty_weights(include_buffers=False):
        model = cls(config)
        for name, spec in specs.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise FactorLMError(f"{FACTORLM_JSON} names module {name} which {cls.__name__} does not have") from None
            try:
                new = structure_from_spec(spec)
            except FactorLMError as e:
                raise FactorLMError(f"{FACTORLM_JSON}: module {name}: {e}") from None
            shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
            if None not in shape and shape != (new.out_features, new.in_features):
                raise FactorLMError(f"{FACTORLM_JSON}: module {name}: shape {new.out_features}x{new.in_features} does not "
                                    f"match the {shape[0]}x{shape[1]} layer of {cls.__name__} in config.json")
            set_module(model, name, new)
    weights.check_match(model, files, set(specs), spec_file=FACTORLM_JSON)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise FactorLMError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    target = dtype if dtype is not None else DTYPES.get(meta.get("dtype") or "fp32", torch.float32)
    weights.load_into(model, files, dtype=target, device=device)
    check_finite(model, f"model in {path}")
    return model.eval()
