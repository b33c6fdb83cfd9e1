"""Load a factorlm folder with plain Hugging Face transformers: ``trust_remote_code=True``.

factorlm copies this file, unchanged, into every folder that holds factorized layers, as
``modeling_factorlm.py``, and names it in ``config.json``'s ``auto_map``.  It imports only torch,
safetensors and transformers (never factorlm), so

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

gives the architecture the folder was saved from (e.g. ``LlamaForCausalLM``: ``generate()`` with the
KV cache works as usual) with each factorized layer a :class:`LowRankLinear` holding the saved
factors, so its logits are exactly ``factorlm.load(folder)``'s.  The folder's ``config.json`` has
``model_type: "factorlm"`` and the original type in ``factorlm_base_model_type``: without
``trust_remote_code`` transformers refuses the folder, loudly, instead of building the original
architecture with randomly initialised layers where the factors are.

Only the ``lowrank`` structure (``y = (x B^T) A^T + b``) is built here; a folder with another
structure (Monarch, block-wise) raises an error naming it: load those with ``factorlm.load`` or export
them with ``factorlm export --format hf`` (a dense standard folder).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

MODEL_TYPE = "factorlm"
BASE_KEY = "factorlm_base_model_type"
SPEC_FILE = "factorlm.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NOT_BASE = ("model_type", BASE_KEY, "auto_map", "transformers_version")


class LowRankLinear(nn.Module):
    """``y = (x B^T) A^T + b`` with ``A`` (out, rank), ``B`` (rank, in): factorlm's ``lowrank`` layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)


def base_config(config_dict: dict) -> PretrainedConfig:
    """The original architecture's config from a factorlm ``config.json`` dict."""
    from transformers import CONFIG_MAPPING

    base_type = config_dict.get(BASE_KEY)
    if base_type not in CONFIG_MAPPING:
        raise ValueError(f"config.json: {BASE_KEY}={base_type!r} is not a model type this transformers knows")
    return CONFIG_MAPPING[base_type].from_dict({k: v for k, v in config_dict.items() if k not in _NOT_BASE})


class FactorLMConfig(PretrainedConfig):
    """Holds the original config's fields as they are; :func:`base_config` rebuilds the original class."""

    model_type = MODEL_TYPE


def _folder(path, kwargs) -> str:
    if os.path.isdir(path):
        return str(path)
    from huggingface_hub import snapshot_download

    keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
    return snapshot_download(str(path), **{k: kwargs[k] for k in keys if kwargs.get(k) is not None})


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    return [os.path.join(folder, SINGLE)]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


_LOAD_KWARGS = {"dtype", "torch_dtype", "device_map", "attn_implementation", "output_loading_info",
                "trust_remote_code", "adapter_kwargs", "cache_dir", "revision", "token", "local_files_only",
                "force_download", "proxies", "code_revision", "quantization_config", "subfolder", "_commit_hash",
                "low_cpu_mem_usage", "use_safetensors", "_from_auto", "_from_pipeline"}


def _device(device_map):
    """One device from ``device_map`` (``"auto"``: the first GPU if any); several devices are refused."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise NotImplementedError("modeling_factorlm.py places the model on one device; pass device_map='cuda:0' "
                                      "or move it with .to() (accelerate's dispatch_model can split it after loading)")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _keep_format_on_save(model: nn.Module, folder: str, saved_config: dict, meta: dict) -> None:
    """``model.save_pretrained`` (and ``push_to_hub``) write a folder that loads the same way again:
    the standard files, then this folder's config fields, ``factorlm.json`` and this file."""
    import shutil

    standard = type(model).save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        out = standard(model, save_directory, *args, **kwargs)
        cfg_path = os.path.join(save_directory, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.update({k: saved_config[k] for k in ("model_type", BASE_KEY, "auto_map", "architectures") if k in saved_config})
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        with open(os.path.join(save_directory, SPEC_FILE), "w") as f:
            json.dump({**meta, "dtype": next((k for k, v in _DTYPES.items() if v == model.dtype), meta.get("dtype"))},
                      f, indent=2)
        here = os.path.abspath(__file__)
        there = os.path.join(save_directory, "modeling_factorlm.py")
        if os.path.abspath(there) != here:
            shutil.copyfile(here, there)
        return out

    model.save_pretrained = save_pretrained


class FactorLMModel(PreTrainedModel):
    """Entry point for the ``AutoModel...`` classes: :meth:`from_pretrained` returns the *original*
    transformers class (the one named in ``factorlm.json``) with the factorized layers swapped in."""

    config_class = FactorLMConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        import transformers
        from safetensors import safe_open

        folder = _folder(pretrained_model_name_or_path, kwargs)
        with open(os.path.join(folder, SPEC_FILE)) as f:
            meta = json.load(f)
        with open(os.path.join(folder, "config.json")) as f:
            saved_config = json.load(f)
        if isinstance(config, FactorLMConfig):  # AutoModel's: the file plus the caller's config overrides
            base = base_config({**saved_config, **config.to_dict()})
        elif isinstance(config, PretrainedConfig):  # the caller's own base config
            base = config
        else:
            base = base_config(saved_config)
        for k in list(kwargs):  # config overrides passed straight to from_pretrained (use_cache=False, ...)
            if k not in _LOAD_KWARGS and hasattr(base, k):
                setattr(base, k, kwargs.pop(k))
        for k in ("quantization_config", "subfolder"):
            if kwargs.get(k):
                raise NotImplementedError(f"modeling_factorlm.py does not take {k}=; load the folder as it is")
        arch = getattr(transformers, meta["model_class"])
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        if dtype in (None, "auto"):
            dtype = _DTYPES.get(meta.get("dtype") or "fp32", torch.float32)
        elif isinstance(dtype, str):
            dtype = _DTYPES.get(dtype) or getattr(torch, dtype)
        try:  # no random initialisation: a skeleton on the meta device (buffers stay real)
            from accelerate import init_empty_weights
        except ImportError:  # plain construction: slower, same result
            import contextlib

            init_empty_weights = lambda include_buffers=False: contextlib.nullcontext()  # noqa: E731
        with init_empty_weights(include_buffers=False):
            model = arch(base)
            for name, spec in meta.get("modules", {}).items():
                if spec.get("structure") != "lowrank":
                    raise NotImplementedError(
                        f"{name} is a factorlm {spec.get('structure')!r} layer, which this loader does not build; "
                        "load the folder with factorlm.load() or export it with `factorlm export --format hf`")
                out_f, in_f = spec["shape"]
                _set_module(model, name, LowRankLinear(in_f, out_f, spec["rank"], spec.get("bias", True)))
        state = {}
        for file in _weight_files(folder):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    state[key] = t.to(dtype) if t.is_floating_point() else t
        # tied weights are stored under one of their names: the same tensor (or the ties transformers
        # declares, not yet made on a meta-device skeleton) fills the others
        pairs = list(dict(getattr(model, "all_tied_weights_keys", None) or {}).items())
        first: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            pairs.append((n, first.setdefault(id(p), n)))
        for _ in range(2):
            for a, b in pairs:
                if a in state and b not in state:
                    state[b] = state[a]
                elif b in state and a not in state:
                    state[a] = state[b]
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
        if unexpected or left:
            raise ValueError(f"{folder}: weights do not fit {meta['model_class']}: "
                             f"unexpected {unexpected[:3]}, not loaded {left[:3]}")
        impl = kwargs.get("attn_implementation") or (  # AutoModel moves it into the config it passes
            getattr(config, "_attn_implementation_internal", None) if isinstance(config, FactorLMConfig) else None)
        if impl:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(impl)
            else:
                model.config._attn_implementation = impl
        device = _device(kwargs.get("device_map"))
        if device is not None:
            model.to(device)
        _keep_format_on_save(model, folder, saved_config, meta)
        model.eval()
        if kwargs.get("output_loading_info"):
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model
