"""Export a saved factorlm folder for deployment: ``factorlm export DIR --format onnx|dense|hf -o OUT``.

Formats
-------
``dense``
    The factors multiplied back into plain ``nn.Linear`` layers (:func:`factorlm.models.densify`,
    ``W = to_dense()``, same bias), saved with :func:`factorlm.models.save`: a factorlm folder
    (``factorlm.json`` with no factorized modules, so ``factorlm.load`` reloads it bit-exactly)
    whose ``config.json`` + ``model.safetensors`` use the standard Hugging Face tensor names, so
    ``AutoModelForSequenceClassification.from_pretrained(OUT)`` (``AutoModelForQuestionAnswering`` for
    an extractive-QA model) loads it without factorlm too.
    **What is lost: the size benefit.**  The model has the dense architecture's parameter count and
    FLOPs again (the report gives both counts); what is kept is the accuracy of the factorized model
    (its function, up to float rounding) and any stack that only runs ``nn.Linear`` can serve it.
``hf``
    The same dense model written by ``transformers``' own ``model.save_pretrained(OUT)`` plus the
    tokenizer (``tokenizer.save_pretrained``): a plain Hugging Face folder, no ``factorlm.json``
    (``factorlm.load`` refuses it; use ``from_pretrained``).  Provenance (source folder, method,
    recipe, scores, measured error) is in ``factorlm_export.json`` and a short ``README.md``.
    ``dense`` vs ``hf``: the weights are the same; ``dense`` is a factorlm folder that happens to be
    HF-loadable (factorlm's writer, ``factorlm.json`` kept, bit-exact ``factorlm.load``), ``hf`` is
    what ``save_pretrained`` writes (its ``config.json`` fields, sharding for large models) and
    nothing factorlm-specific except the provenance files.
``onnx``
    An ONNX graph of the **factorized** model: each low-rank layer stays two ``MatMul`` nodes
    (``x B^T`` then ``A^T``; Monarch: two batched ``MatMul`` plus permutations), so the file keeps
    the parameter savings.  Exported with the classic TorchScript-based ``torch.onnx.export(...,
    dynamo=False)``: the ``torch.export``-based exporter (the default since torch 2.9) needs the
    extra ``onnxscript`` package, and tracing a BERT-style encoder is exact here.  Attention is
    exported with transformers' ``eager`` implementation (plain ``MatMul``/``Softmax``, portable to
    any runtime).  Inputs ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` when the model
    and tokenizer use them), int64, dynamic ``batch`` and ``sequence`` axes; output ``logits``
    ``(batch, num_labels)``, or for an extractive-QA model (``*ForQuestionAnswering``) the two outputs
    ``start_logits`` and ``end_logits`` ``(batch, sequence)``.  ``config.json`` and the tokenizer
    files are written next to ``model.onnx``.  ``--int8`` adds ``model_int8.onnx``: onnxruntime's
    dynamic quantization (``quantize_dynamic``: int8 weights, activations quantized per call),
    typically ~3-4x smaller again, at a loss of accuracy that is measured and reported but never
    fails the export.

Verification and tolerances
---------------------------
Every export is checked before it is renamed into place: the exported artefact is re-loaded (dense:
with ``factorlm.load`` *and* plain ``transformers``; hf: plain ``transformers``; onnx: an
onnxruntime CPU session) and run on a seeded random batch (``batch_size`` x ``seq_len`` token ids,
one row half padding, random token types), and its logits are compared with the factorized torch
model's (every output head: for a QA model both ``start_logits`` and ``end_logits``, the error being
the max over both).  ONNX is also run on a second batch of another shape to exercise the dynamic axes.

* fp32 (dense, hf, onnx): ``max |logits - ref| <= 1e-4 * max(1, max |ref|)`` (:data:`FP32_RTOL`),
  i.e. an absolute 1e-4 for logits of order one, relative to the logit scale beyond.  Measured
  errors are float-rounding level (a factorized MiniLM-L6 at keep 0.25, seq 128: dense/hf 8.3e-7,
  onnx 7.7e-7; the tiny test models ~1e-9); exceeding the bound is an error and nothing is written.
* int8 (onnx ``--int8``): reported against ``0.1 * max(1, max |ref|)`` (:data:`INT8_RTOL`), a loose
  sanity bound for dynamic quantization; exceeding it is a note in the report, not an error (measure
  task accuracy with the int8 model before deploying it: on the factorized MiniLM-L6 above the int8
  logits moved by up to 0.22 at a logit scale of 0.94, the low-rank activations being quantized too).
  The report also gives the share of verification rows whose argmax is unchanged.

Every output folder also holds ``factorlm_export.json``: the source folder, its ``factorlm.json``
record (method, recipe, scores), the format, the measured errors and tolerances, parameter counts,
the exporter and opset, and library versions.

Errors (a wrong format, an input that is not a factorlm folder, an existing output without
``overwrite``, onnx/onnxruntime not installed, a failed verification) are one-line
:class:`~factorlm.errors.FactorLMError` messages, and outputs are written atomically
(:func:`factorlm.models.io.atomic_dir`): a failed export leaves no folder behind.

References
----------
* PyTorch, *torch.onnx* (TorchScript-based exporter, ``dynamo=False``):
  https://docs.pytorch.org/docs/stable/onnx_torchscript.html
* ONNX Runtime, *Quantize ONNX models* (``quantize_dynamic``):
  https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html
* Hugging Face Transformers, ``PreTrainedModel.save_pretrained`` / ``from_pretrained``:
  https://huggingface.co/docs/transformers/main_classes/model
* Dao et al., *Monarch: Expressive Structured Matrices for Efficient and Accurate Training*,
  ICML 2022 (the ``monarch`` structure, exported as two batched matmuls).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import inspect
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FactorLMError

if TYPE_CHECKING:  # torch is imported where it is used, so `factorlm --help` stays quick
    import torch
    from torch import nn

FORMATS = ("onnx", "dense", "hf")
#: fp32 exports: max |logits - ref| <= FP32_RTOL * max(1, max |ref|)
FP32_RTOL = 1e-4
#: int8 ONNX (reported only): max |logits - ref| <= INT8_RTOL * max(1, max |ref|)
INT8_RTOL = 1e-1
#: opset used when none is given (LayerNormalization is a single op from 17 on)
DEFAULT_OPSET = 17
EXPORT_JSON = "factorlm_export.json"
ONNX_NAME = "model.onnx"
ONNX_INT8_NAME = "model_int8.onnx"
ONNX_HINT = "pip install 'factorlm[onnx]'"
_TOKENIZER_HINTS = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model")
_SEED = 0


# -- public API -------------------------------------------------------------------------------------
def export(
    path: str,
    fmt: str,
    output: str,
    *,
    overwrite: bool = False,
    quantize_int8: bool = False,
    opset: int | None = None,
    seq_len: int = 128,
    batch_size: int = 2,
) -> dict[str, Any]:
    """Export the factorlm folder ``path`` as ``fmt`` (``onnx`` | ``dense`` | ``hf``) into ``output``.

    Returns the report: ``format``, ``output``, ``files`` (name -> bytes), ``size_bytes``,
    ``max_abs_diff`` (vs the factorized torch model's logits, max over its output heads), ``tolerance``,
    ``notes`` and format-specific entries (parameter counts; for onnx the exporter, opset, inputs,
    outputs, MatMul count, factor check and the int8 results).  See the module docstring for the
    formats and tolerances.
    """
    import torch
    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise FactorLMError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quantize_int8 and fmt != "onnx":
        raise FactorLMError("--int8 applies to --format onnx only")
    if int(seq_len) < 2 or int(batch_size) < 1:
        raise FactorLMError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    src = _check_source(path)
    out = Path(output).expanduser().resolve()
    if out == src or src in out.parents:
        raise FactorLMError(f"the output folder {output} must not be the input folder {path} or inside it")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FactorLMError(f"output folder {out} already exists and is not empty (use --overwrite)")
    if fmt == "onnx":
        _require_onnx(quantize_int8)

    from .models import count_params, densify, load, read_meta
    from .models.io import atomic_dir
    from .models.surgery import factorized_modules

    model = load(str(src), dtype="fp32")  # the reference in fp32 whatever the saved dtype (bf16 has no ORT kernels)
    meta = read_meta(str(src)) or {}
    tokenizer = _load_tokenizer(src)
    inputs = _example_inputs(model, tokenizer, batch_size, seq_len, seed=_SEED)
    with torch.no_grad():
        ref = _heads(model(**inputs))
    n_factorized = len(factorized_modules(model))
    params_factorized = count_params(model)
    params_dense = count_params(densify(model)) if n_factorized else params_factorized
    report: dict[str, Any] = {
        "format": fmt,
        "source": str(src),
        "output": str(out),
        "params_factorized": params_factorized,
        "params_dense": params_dense,
        "factorized_modules": n_factorized,
        "verify_batch": [int(x) for x in inputs["input_ids"].shape],
        "notes": [],
    }
    if not n_factorized:
        report["notes"].append("the source has no factorized modules: the export is the dense model as it is")
    if tokenizer is None:
        report["notes"].append("the source folder has no tokenizer files: none were exported")

    with atomic_dir(out, overwrite=overwrite) as tmp, _quiet():
        if fmt == "dense":
            _export_dense(model, meta, tokenizer, tmp, inputs, ref, report)
        elif fmt == "hf":
            _export_hf(model, tokenizer, tmp, inputs, ref, report)
        else:
            _export_onnx(model, tokenizer, tmp, inputs, ref, report, quantize_int8=quantize_int8, opset=opset,
                         seed=_SEED)
        _write_provenance(tmp, report, meta)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    report["files"] = files
    report["size_bytes"] = sum(files.values())
    return report


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``subparsers`` (from ``parser.add_subparsers(dest="command")``)."""
    p = subparsers.add_parser(
        "export", help="export a saved folder: onnx (factorized graph), dense (factors multiplied back), hf",
        description="Export a factorlm folder. onnx: the factorized model as an ONNX graph (factors kept as two "
                    "MatMuls, checked in onnxruntime); dense: factors multiplied back into nn.Linear, a factorlm "
                    "folder that plain transformers also loads (gives up the size benefit); hf: the dense model "
                    "as a plain transformers save_pretrained folder.",
    )
    p.add_argument("path", help="factorlm model folder (from `factorlm compress`)")
    p.add_argument("--format", dest="format", required=True, choices=FORMATS, help="onnx | dense | hf")
    p.add_argument("--output", "-o", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--int8", action="store_true", help="onnx: also write model_int8.onnx (dynamic int8 quantization)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length of the verification batch (default 128)")
    p.add_argument("--opset", type=int, help=f"onnx: opset version (default {DEFAULT_OPSET})")
    return p


def run(args: argparse.Namespace) -> None:
    """Run ``factorlm export`` from parsed arguments and print a short summary."""
    report = export(args.path, args.format, args.output, overwrite=args.overwrite,
                    quantize_int8=getattr(args, "int8", False), opset=getattr(args, "opset", None),
                    seq_len=getattr(args, "seq_len", None) or 128)
    print(format_report(report))


def format_report(report: dict[str, Any]) -> str:
    """The human summary ``factorlm export`` prints."""
    lines = [f"exported {report['source']} as {report['format']} to {report['output']}"]
    for name, size in report["files"].items():
        lines.append(f"  {name:<28} {_human(size):>10}")
    lines.append(f"  {'total':<28} {_human(report['size_bytes']):>10}")
    ok = "ok" if report["max_abs_diff"] <= report["tolerance"] else "EXCEEDED"
    lines.append(f"max |logits diff| vs the factorized model: {report['max_abs_diff']:.3g} "
                 f"(tolerance {report['tolerance']:.3g}, {ok})")
    if "int8_max_abs_diff" in report:
        ok8 = "ok" if report["int8_within_tolerance"] else "exceeded: check task accuracy"
        agree = report.get("int8_argmax_agreement")
        lines.append(f"int8 max |logits diff|: {report['int8_max_abs_diff']:.3g} "
                     f"(reported against {report['int8_tolerance']:.3g}, {ok8})"
                     + (f", same argmax on {agree:.0%} of the verification rows" if agree is not None else ""))
    lines.append(f"parameters: factorized {report['params_factorized']:,}, dense {report['params_dense']:,}")
    if report["format"] == "onnx":
        lines.append(f"exporter: {report['exporter']}, opset {report['opset']}, inputs {', '.join(report['inputs'])}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet():
    """No transformers progress bars and no library log warnings (onnxruntime's quantizer logs to the root
    logger) while exporting; restored afterwards."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        hf_logging = None
    bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if bars:
        hf_logging.disable_progress_bar()
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(previous)
        if bars:
            hf_logging.enable_progress_bar()


# -- checks -------------------------------------------------------------------------------------------
def _check_source(path: str) -> Path:
    from .models import weights
    from .models.io import WEIGHTS_NAME
    from .models.loading import FACTORLM_JSON

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FactorLMError(f"model folder does not exist: {path}")
    if not (p / FACTORLM_JSON).is_file() or not weights.files(p):
        raise FactorLMError(f"{path} is not a factorlm model folder (needs {FACTORLM_JSON} and {WEIGHTS_NAME}); "
                            "export takes a folder saved by factorlm")
    return p.resolve()


def _require_onnx(int8: bool) -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise FactorLMError(f"--format onnx needs {' and '.join(missing)}: {ONNX_HINT}")
    if int8 and importlib.util.find_spec("onnxruntime.quantization") is None:
        raise FactorLMError(f"--int8 needs onnxruntime.quantization: {ONNX_HINT}")


def _heads(outputs) -> dict[str, torch.Tensor]:
    """A model's outputs as named fp32 tensors: ``{"logits": ..}``, or ``{"start_logits": .., "end_logits": ..}``
    for an extractive-QA (span) head.  Every comparison, ONNX output and tolerance below goes over these."""
    from .train.evaluate import output_heads

    return {k: v.float() for k, v in output_heads(outputs).items()}


def _tolerance(rtol: float, *refs: dict[str, torch.Tensor]) -> float:
    """``rtol * max(1, max |ref|)`` over every head of every reference batch."""
    return float(rtol * max([1.0, *(h.abs().max().item() for r in refs for h in r.values())]))


def _max_diff(got: dict[str, Any], ref: dict[str, torch.Tensor]) -> float:
    """Max |got - ref| over all heads (``got`` values may be numpy arrays, e.g. from onnxruntime)."""
    import torch
    if list(got) != list(ref):
        raise FactorLMError(f"exported model gives outputs {', '.join(got)}, expected {', '.join(ref)}")
    worst = 0.0
    for name, b in ref.items():
        a = torch.as_tensor(got[name], dtype=torch.float32)
        if a.shape != b.shape:
            raise FactorLMError(f"exported model gives {name} of shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        if not torch.isfinite(a).all():
            return float("inf")
        worst = max(worst, float((a - b).abs().max().item()))
    return worst


def _argmax_agreement(pairs: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]) -> float | None:
    """Share of rows (over all heads and batches) whose argmax is unchanged; None for single-output heads."""
    import torch
    same = total = 0
    for got, ref in pairs:
        for name, r in ref.items():
            if r.shape[-1] > 1:
                same += int((torch.as_tensor(got[name]).argmax(-1) == r.argmax(-1)).sum())
                total += r.argmax(-1).numel()
    return same / total if total else None


def _check_within(what: str, diff: float, tol: float) -> None:
    if not diff <= tol:
        raise FactorLMError(f"{what} logits differ from the factorized model by {diff:.3g} > tolerance {tol:.3g}; "
                            "nothing was written")


# -- inputs / tokenizer -----------------------------------------------------------------------------
def _load_tokenizer(src: Path):
    if not any((src / n).is_file() for n in _TOKENIZER_HINTS):
        return None
    from transformers import AutoTokenizer

    try:
        from .models.hub_folder import tokenizer_kwargs

        return AutoTokenizer.from_pretrained(str(src), **tokenizer_kwargs(src))
    except Exception as e:  # noqa: BLE001 - a broken tokenizer is the user's folder
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FactorLMError(f"cannot load the tokenizer in {src}: {msg}") from None


def _input_names(model: nn.Module, tokenizer) -> list[str]:
    """``input_ids``, ``attention_mask`` and ``token_type_ids`` where the model (and tokenizer) take it."""
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and int(getattr(model.config, "type_vocab_size", 0) or 0) > 0:
        tok_names = getattr(tokenizer, "model_input_names", None) if tokenizer is not None else None
        if tok_names is None or "token_type_ids" in tok_names:
            names.append("token_type_ids")
    return names


def _example_inputs(model: nn.Module, tokenizer, batch_size: int, seq_len: int, *, seed: int) -> dict[str, torch.Tensor]:
    """A seeded random batch: token ids over the vocabulary, the last row half padding, random token types."""
    import torch
    cfg = model.config
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    offset = 2 if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0
    if max_pos:
        seq_len = min(seq_len, max_pos - offset)
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0) or (len(tokenizer) if tokenizer is not None else 100)
    lo = min(5, vocab - 1)  # keep clear of special ids where the vocabulary allows
    ids = torch.randint(lo, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, max(1, seq_len // 2):] = 0
    pad = getattr(cfg, "pad_token_id", None)
    if pad is not None and 0 <= int(pad) < vocab:
        ids[mask == 0] = int(pad)
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in _input_names(model, tokenizer):
        types = int(getattr(cfg, "type_vocab_size", 1) or 1)
        out["token_type_ids"] = torch.randint(0, types, ids.shape, generator=g)
    return out


# -- dense / hf ---------------------------------------------------------------------------------------
def _dense_notes(report: dict[str, Any]) -> None:
    if report["factorized_modules"]:
        pf, pd = report["params_factorized"], report["params_dense"]
        report["notes"].append(
            f"dense gives up the size benefit: {pf:,} -> {pd:,} parameters ({pd / pf:.2f}x), the dense "
            "architecture's count and FLOPs; the factorized model's function is kept")


def _hf_class(model: nn.Module):
    import transformers

    cls = getattr(transformers, type(model).__name__, None)
    if cls is None:
        raise FactorLMError(f"{type(model).__name__} is not a transformers class; cannot export it for from_pretrained")
    return cls


def _hf_reload_heads(model: nn.Module, folder: Path, inputs) -> dict[str, torch.Tensor]:
    """Output heads of ``folder`` loaded by plain transformers (no factorlm code involved)."""
    import torch
    cls = _hf_class(model)
    try:
        hf = cls.from_pretrained(str(folder)).float().eval()
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise FactorLMError(f"transformers cannot load the export ({cls.__name__}.from_pretrained): {msg}") from None
    with torch.no_grad():
        return _heads(hf(**inputs))


def _export_dense(model, meta, tokenizer, tmp: Path, inputs, ref, report) -> None:
    import torch
    from .models import densify, load, save

    dense = densify(model).eval()
    # what describes the factorized source (its accounting, FLOPs, latency, speed check, structure)
    # would be false of this folder: it moves under export.source_meta
    about_source = ("accounting", "flops_per_sequence", "latency", "speed_check", "structure", "method_info", "dtype")
    skip = ("format_version", "model_class", "modules", "versions", "created", *about_source)
    keep = {k: v for k, v in meta.items() if k not in skip}
    keep["method"] = f"dense export of {meta.get('method', '?')}"
    keep["export"] = {"format": "dense", "source": report["source"], "params_factorized": report["params_factorized"],
                      "source_modules": meta.get("modules", {}),
                      "source_meta": {k: meta[k] for k in about_source if k in meta}}
    save(dense, tmp, tokenizer=tokenizer, meta=keep, overwrite=True)
    tol = _tolerance(FP32_RTOL, ref)
    reloaded = load(str(tmp))
    with torch.no_grad():
        dense_heads = _heads(dense(**inputs))
        fl_heads = _heads(reloaded(**inputs))
    report["reload_bit_exact"] = list(fl_heads) == list(dense_heads) and all(
        torch.equal(fl_heads[k], dense_heads[k]) for k in dense_heads)
    d_factorlm = _max_diff(fl_heads, ref)
    d_hf = _max_diff(_hf_reload_heads(model, tmp, inputs), ref)
    report.update(max_abs_diff=max(d_factorlm, d_hf), tolerance=tol, max_abs_diff_factorlm_load=d_factorlm,
                  max_abs_diff_from_pretrained=d_hf)
    _check_within("the dense export's", report["max_abs_diff"], tol)
    if not report["reload_bit_exact"]:
        raise FactorLMError("the dense export does not reload bit-exactly with factorlm.load; nothing was written")
    _dense_notes(report)
    report["notes"].append("dense = a factorlm folder (factorlm.load, bit-exact) that plain transformers "
                           "from_pretrained also loads")


def _export_hf(model, tokenizer, tmp: Path, inputs, ref, report) -> None:
    from .models import densify

    dense = densify(model).eval()
    config = copy.deepcopy(dense.config)
    config.architectures = [type(dense).__name__]
    dense.config = config
    dense.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    tol = _tolerance(FP32_RTOL, ref)
    d = _max_diff(_hf_reload_heads(model, tmp, inputs), ref)
    report.update(max_abs_diff=d, tolerance=tol)
    _check_within("the hf export's", d, tol)
    _dense_notes(report)
    report["notes"].append("hf = transformers' save_pretrained folder (no factorlm.json; load it with "
                           "from_pretrained); provenance in factorlm_export.json and README.md")
    (tmp / "README.md").write_text(_hf_readme(report, _auto_class_name(dense)))


def _auto_class_name(model: nn.Module) -> str:
    """The transformers Auto class that loads the export (named in the README snippet)."""
    if type(model).__name__.endswith("ForQuestionAnswering"):
        return "AutoModelForQuestionAnswering"
    return "AutoModelForSequenceClassification"


def _hf_readme(report: dict[str, Any], auto_class: str = "AutoModelForSequenceClassification") -> str:
    return (
        "# Dense export of a factorlm model\n\n"
        f"Exported by `factorlm export --format hf` from `{report['source']}`: the low-rank factors were multiplied "
        "back into plain `nn.Linear` weights, so this is an ordinary Hugging Face folder:\n\n"
        f"```python\nfrom transformers import {auto_class}, AutoTokenizer\n"
        f"model = {auto_class}.from_pretrained(PATH)\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n\n"
        f"It has the dense architecture's {report['params_dense']:,} parameters (the factorized model had "
        f"{report['params_factorized']:,}); its logits match the factorized model's within "
        f"{report['max_abs_diff']:.3g} (tolerance {report['tolerance']:.3g}).  Method, recipe, scores and "
        f"library versions of the source: `{EXPORT_JSON}`.\n"
    )


# -- onnx -------------------------------------------------------------------------------------------
def _heads_only(model: nn.Module, names: list[str], heads: list[str]) -> nn.Module:
    """A module mapping positional inputs to the tuple of output heads (what torch.onnx.export traces):
    ``(logits,)``, or ``(start_logits, end_logits)`` for a QA model."""
    from torch import nn

    class HeadsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.names = list(names)
            self.heads = list(heads)

        def forward(self, *args):
            out = self.model(**dict(zip(self.names, args)), return_dict=True)
            return tuple(getattr(out, h) for h in self.heads)

    return HeadsOnly()


def _eager_attention(model: nn.Module, report: dict[str, Any]) -> None:
    """Switch attention to transformers' plain ``eager`` implementation for a portable graph."""
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:  # older transformers
            model.config._attn_implementation = "eager"
        report["attention"] = "eager"
    except Exception:  # noqa: BLE001 - a model without the choice keeps its own implementation
        report["attention"] = str(getattr(model.config, "_attn_implementation", "default"))


def _onnx_export(wrapper: nn.Module, args: tuple, f: Path, names: list[str], heads: list[str], opset: int) -> str:
    import torch
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    for h in heads:  # logits (batch, num_labels); QA start/end logits (batch, sequence)
        dyn[h] = {0: "batch"} if h == "logits" else {0: "batch", 1: "sequence"}
    kwargs: dict[str, Any] = dict(input_names=names, output_names=list(heads), dynamic_axes=dyn,
                                  opset_version=opset, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(wrapper, args, str(f), **kwargs)
        except Exception as e:  # noqa: BLE001 - an unsupported op etc.: one line
            msg = " ".join(str(e).split())[:300] or type(e).__name__
            raise FactorLMError(f"torch.onnx.export failed: {msg}") from None
    return "torch.onnx.export (TorchScript-based, dynamo=False)"


def _ort_heads(onnx_file: Path, inputs: dict[str, torch.Tensor], names: list[str], heads: list[str]):
    """The named outputs ``heads`` of ``onnx_file`` run in onnxruntime (CPU), as a dict of numpy arrays."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
    return dict(zip(heads, sess.run(list(heads), {n: inputs[n].numpy() for n in names})))


def onnx_graph_stats(onnx_file: str | os.PathLike) -> dict[str, Any]:
    """``matmul_nodes`` (MatMul + Gemm), ``weight_elements`` (floats in initializers) and ``initializer_shapes``."""
    import numpy as np
    import onnx

    g = onnx.load(str(onnx_file), load_external_data=False).graph
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE}
    shapes = [tuple(int(d) for d in t.dims) for t in g.initializer if t.data_type in float_types]
    for n in g.node:  # constants folded into Constant nodes instead of initializers
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in float_types:
                    shapes.append(tuple(int(d) for d in a.t.dims))
    return {
        "matmul_nodes": sum(n.op_type in ("MatMul", "Gemm") for n in g.node),
        "weight_elements": int(sum(int(np.prod(s)) if s else 1 for s in shapes)),
        "initializer_shapes": shapes,
    }


def _factor_shapes_found(model: nn.Module, shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """How many factor tensors (bias excluded) of the factorized modules appear among the graph's
    float initializers, in any axis order (the exporter stores ``B^T`` / ``A^T``)."""
    from collections import Counter

    from .models.surgery import factorized_modules

    avail = Counter(tuple(sorted(s)) for s in shapes)
    want = Counter(tuple(sorted(p.shape)) for m in factorized_modules(model).values()
                   for n, p in m.named_parameters() if n != "bias")
    found = sum(min(c, avail[k]) for k, c in want.items())
    return found, sum(want.values())


def _export_onnx(model, tokenizer, tmp: Path, inputs, ref, report, *, quantize_int8: bool, opset: int | None,
                 seed: int) -> None:
    import torch
    from .models.surgery import factorized_modules

    names = _input_names(model, tokenizer)
    opset = int(opset) if opset is not None else DEFAULT_OPSET
    work = copy.deepcopy(model).eval()
    _eager_attention(work, report)
    heads = list(ref)
    wrapper = _heads_only(work, names, heads).eval()  # eval: the exporter restores the wrapper's mode afterwards
    f = tmp / ONNX_NAME
    report["exporter"] = _onnx_export(wrapper, tuple(inputs[n] for n in names), f, names, heads, opset)
    report.update(opset=opset, inputs=names, outputs=heads, dynamic_axes={"batch": 0, "sequence": 1})

    # verify: the export batch, and a second batch of another shape (dynamic axes)
    b, L = inputs["input_ids"].shape
    other = _example_inputs(model, tokenizer, b + 1, max(2, L // 2 + 1), seed=seed + 1)
    with torch.no_grad():
        ref2 = _heads(model(**other))
    tol = _tolerance(FP32_RTOL, ref, ref2)
    d = max(_max_diff(_ort_heads(f, inputs, names, heads), ref),
            _max_diff(_ort_heads(f, other, names, heads), ref2))
    report.update(max_abs_diff=d, tolerance=tol, runtime="onnxruntime CPUExecutionProvider")
    _check_within("the ONNX export's (onnxruntime)", d, tol)

    # the graph keeps the factors
    stats = onnx_graph_stats(f)
    found, wanted = _factor_shapes_found(model, stats["initializer_shapes"])
    n_fact = len(factorized_modules(model))
    report.update(onnx_matmul_nodes=stats["matmul_nodes"], onnx_weight_elements=stats["weight_elements"],
                  factor_tensors_in_graph=f"{found}/{wanted}")
    if n_fact and (found < wanted or stats["weight_elements"] >= report["params_dense"]):
        raise FactorLMError(f"the ONNX graph does not keep the factors ({found}/{wanted} factor tensors, "
                            f"{stats['weight_elements']:,} weights vs {report['params_dense']:,} dense); nothing was written")
    if n_fact:
        report["notes"].append(f"factors kept: {found}/{wanted} factor tensors in the graph, "
                               f"{stats['weight_elements']:,} stored weights vs {report['params_dense']:,} dense")

    if quantize_int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = tmp / ONNX_INT8_NAME
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                quantize_dynamic(str(f), str(q), weight_type=QuantType.QInt8)
            except Exception as e:  # noqa: BLE001
                msg = " ".join(str(e).split())[:300] or type(e).__name__
                raise FactorLMError(f"int8 quantization (onnxruntime quantize_dynamic) failed: {msg}") from None
        q1, q2 = _ort_heads(q, inputs, names, heads), _ort_heads(q, other, names, heads)
        d8 = max(_max_diff(q1, ref), _max_diff(q2, ref2))
        tol8 = _tolerance(INT8_RTOL, ref, ref2)
        agree = _argmax_agreement([(q1, ref), (q2, ref2)])
        report.update(int8_max_abs_diff=d8, int8_tolerance=tol8, int8_within_tolerance=bool(d8 <= tol8),
                      int8_argmax_agreement=agree,
                      int8_method="onnxruntime.quantization.quantize_dynamic (QInt8 weights, dynamic activations)")
        report["notes"].append(
            f"{ONNX_INT8_NAME}: dynamic int8 quantization, max |diff| {d8:.3g} vs the loose bound {tol8:.3g}"
            + ("" if d8 <= tol8 else " (EXCEEDED - measure task accuracy before using it)")
            + "; not a verified-exact export")

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


# -- provenance / helpers -----------------------------------------------------------------------------
def _write_provenance(tmp: Path, report: dict[str, Any], meta: dict[str, Any]) -> None:
    from .models.io import _json_default, library_versions

    record = {
        "export": {k: v for k, v in report.items() if k != "output"},
        "source_factorlm_json": meta,
        "versions": library_versions() | _onnx_versions(report["format"]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / EXPORT_JSON).write_text(json.dumps(record, indent=2, default=_json_default) + "\n")


def _onnx_versions(fmt: str) -> dict[str, str]:
    if fmt != "onnx":
        return {}
    import importlib.metadata as md

    out = {}
    for pkg in ("onnx", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


__all__ = ["FORMATS", "FP32_RTOL", "INT8_RTOL", "add_parser", "export", "format_report", "onnx_graph_stats", "run"]

