"""``--task lm``: one-shot low-rank compression of a causal language model, evaluated by perplexity.

    factorlm compress --task lm --model smollm2 --method whiten --keep 0.8 --rank-policy global

The stages (one module each in this package): read the calibration and evaluation text and count the
evaluation tokens (before the model is loaded: a missing or too-short text fails at once), load the
causal LM in its checkpoint's dtype (:mod:`.load`; a folder, a hub id, a ``.gguf`` file converted
once, or the alias ``smollm2``), score the dense model (:mod:`.evaluate`: perplexity, a greedy
sample, generation speed), plan the ranks (:mod:`.plan`), factorize every target of the decoder
blocks with the method's input scaling while streaming the calibration windows block by block
(:mod:`.factorize`, :mod:`.calibrate`), optionally heal the factors (:mod:`.heal`), score again, save
(:mod:`.save`: sharded safetensors in the model's dtype), and only then time the compressed model and
draw the report.  One copy of the model is held throughout.

Targets: every ``nn.Linear`` (or GPT-2 ``Conv1D``) inside the decoder blocks; embeddings and the LM head
are never factorized.  ``--keep`` is the share of the target weights kept; SVD-LLM's "compression
ratio" is ``1 - keep`` (with the same share of every matrix: ``--rank-policy uniform``).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from torch import nn

from .. import models
from ..config import RunConfig
from ..errors import FactorLMError, check
from ..models.surgery import find_targets, get_module, linear_shape
from .evaluate import Log, check_eval_tokens, flops_per_token, greedy_sample, param_groups, ppl
from .generation import PROMPTS, continuations, loop_warning
from .accounting import describe_quant, source_bytes, target_bytes, tensor_bytes
from .placement import GPU_SHARE, dispatched, heal_fits, offloaded, resolve_device

TASK = "lm"
METRIC = "perplexity"


def check_config(c: RunConfig):
    """Everything about the settings that can be wrong, before any work (one-line errors)."""
    from .methods import LM_METHODS, get_lm_method

    check(c.method in LM_METHODS, f"--task lm takes --method {' | '.join(LM_METHODS.names())}, got {c.method!r}")
    method = get_lm_method(c.method, c.method_options)
    check(c.structure == "lowrank", f"--task lm factorizes into low rank only, got --structure {c.structure}")
    check(c.schedule == "oneshot", "--task lm is one-shot (calibrated layer by layer); --schedule staged does not apply")
    check(not c.skip_slow, "--skip-slow does not apply to --task lm yet")
    check(c.keep is not None or c.rank is not None, "give --keep or --rank")
    resolve_device(c.device)
    check(not (c.offload != "none" and c.rank is None and c.rank_policy == "global" and c.global_score == "fisher"),
          "--global-score fisher back-propagates through the whole model at once, which --offload cannot bound: "
          "use --global-score energy or --rank-policy uniform")
    check(c.ranks is None, "--ranks does not apply to --task lm yet: give --keep or --rank")
    if getattr(method, "output_side", False):
        check(c.offload == "none", f"--method {c.method}" + (" --correction-space kfac" if c.method != "kfac" else "")
              + " back-propagates through the whole model at once (the output-gradient Grams), which --offload cannot "
              "bound: use " + ("--method whiten" if c.method == "kfac" else "--correction-space input"))
        check(c.global_score == "fisher" or c.rank is not None or c.rank_policy == "uniform",
              f"--global-score {c.global_score} does not apply to --method {c.method}: its spectra are loss "
              "estimates already (leave --global-score out)")
    check(not (c.offload != "none" and getattr(method.options, "byte_plan", "uniform") == "global"),
          "--byte-plan global back-propagates through the whole model at once (the output sensitivity), which "
          "--offload cannot bound: use --byte-plan uniform")
    if c.refine_steps is None:  # the method's default: factorlm's recipe refines, the published methods do not
        c.refine_steps = method.default_refine_steps
    if c.refine_steps:
        check(method.calibrated, f"--refine-steps needs the calibration stream, which --method {c.method} does not "
                                 "use: pick a calibrated method (whiten, asvd, rtn-lowrank, gptq-lowrank; gptq with --refine-params all)")
        check(c.refine_params == "all" or getattr(method, "corrects", True),
              f"--refine-steps with --refine-params factors trains the correction factors, which --method "
              f"{c.method} does not have: use --refine-params all or --method {c.method}-lowrank")
    if c.refine_loss == "fisher":
        check(c.refine_steps, "--refine-loss fisher weights the refinement's error: it needs --refine-steps > 0")
        check(c.offload == "none", "--refine-loss fisher back-propagates through the whole model at once (the block "
                                   "outputs' gradient Grams), which --offload cannot bound: use --refine-loss mse")
    if hasattr(type(method), "quant"):
        bits = getattr(method.options, "bits", None)
        check(bits is None or 2 <= bits <= 8, f"--bits must be in [2, 8], got {bits}")
        group = getattr(method.options, "group_size", None)
        check(group is None or group > 0, f"--group-size must be > 0, got {group}")
        check(not (c.heal_steps and c.heal_params == "factors" and (not method.corrects or
                                                                     getattr(method.options, "factor_bits", 16) == 8)),
              f"--heal-steps trains the correction factors, which --method {c.method} stores as integer codes: "
              f"use --method {c.method.split('-')[0]}-lowrank --factor-bits 16 "
              "(or --heal-params all)")
        check(c.rank is None and c.rank_policy == "uniform",
              f"--method {c.method} takes a byte budget (--keep, the share of the targets' bf16 bytes) with "
              "--rank-policy uniform")
    return method


def _text(source: str | None, default: str, what: str) -> tuple[str, list[str]]:
    from ..data.text import read_documents

    name = source or default
    docs = read_documents(name)
    check(len(docs) > 0 and any(d.strip() for d in docs), f"{what} text {name} is empty")
    return name, docs


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Refuse models whose decoder blocks keep weights outside the targets (fused 3-D expert tensors of
    mixture-of-experts models: ``--keep`` would then trim a few percent of the model, silently)."""
    from .calibrate import decoder_blocks

    blocks_name, _ = decoder_blocks(model, targets)
    inside = [(n, p) for n, p in model.named_parameters() if n.startswith(blocks_name + ".") and p.dim() == 3]
    if inside:
        in_fused = sum(p.numel() for _, p in inside)
        total = sum(p.numel() for p in model.parameters())
        raise FactorLMError(
            f"{type(model).__name__} keeps {in_fused / total:.0%} of its parameters in fused 3-D tensors (e.g. "
            f"{inside[0][0]}: mixture-of-experts weights), which --task lm cannot factorize yet; only its "
            f"{len(targets)} 2-D layers would be compressed")


def compress_lm(config: RunConfig, *, quiet: bool = False, save: bool = True):
    """Compress a causal LM one-shot (see the module docstring); returns an :class:`factorlm.api.Report`."""
    from accelerate.utils import set_seed

    from ..api import Report, _output_dir
    from ..data.text import (DEFAULT_CALIBRATION, DEFAULT_EVAL, bos_token, calibration_blocks, describe, token_stream,
                             with_bos)
    from ..ranks.budget import Accounting, break_even_rank
    from . import evaluate, save as saving
    from .calibrate import token_batches
    from .factorize import factorize
    from .heal import heal
    from .refine import RefineSpec
    from .evaluate import eval_window
    from .load import (SMOLLM2, language_model_prefix, load_causal_lm, load_tokenizer, model_context, precheck,
                       resolve_causal_model)
    from .methods import quant_ranks
    from .plan import byte_plan_targets, check_byte_plan, plan_ranks, spectra as scaled_spectra

    c = config.validate()
    method = check_config(c)
    log = Log(quiet)
    keep_tag = f"k{c.keep:g}" if c.rank is None else f"r{c.rank}"
    out = _output_dir(c, f"runs/lm-{c.method}-{keep_tag}") if save else None
    need_calibration = method.calibrated or c.heal_steps or (
        c.rank is None and c.rank_policy == "global" and c.global_score == "fisher")
    calib_name, calib_docs = _text(c.calibration, DEFAULT_CALIBRATION, "calibration") if need_calibration \
        else (None, [])
    eval_name, eval_docs = _text(c.eval_text, DEFAULT_EVAL, "evaluation")
    set_seed(c.seed)
    t_start = time.perf_counter()

    # the texts are tokenized before the model loads: a too-short evaluation text costs seconds, not a load
    shown = c.model or SMOLLM2
    resolved = resolve_causal_model(shown, cache_dir=c.cache_dir)
    precheck(resolved, shown)
    tokenizer = load_tokenizer(resolved, shown)
    bos = bos_token(tokenizer, c.bos)
    c.eval_seq_len = eval_window(c, model_context(resolved))  # recorded in the recipe as it ran
    eval_ids = token_stream(tokenizer, eval_docs)
    if c.eval_max_tokens:
        eval_ids = eval_ids[: c.eval_max_tokens]
    check_eval_tokens(eval_ids, c, eval_name)
    text_info = {"evaluation": {**describe(eval_name, eval_ids), "window_tokens": c.eval_seq_len, "bos": bos}}
    windows = calib_ids = None
    if calib_docs:
        calib_ids = token_stream(tokenizer, calib_docs)
        windows = with_bos(calibration_blocks(calib_ids, c.seq_len - (bos is not None), c.calibration_samples,
                                              c.seed), bos)
        text_info["calibration"] = {**describe(calib_name, calib_ids), "windows": int(windows.shape[0]),
                                    "window_tokens": c.seq_len, "tokens": int(windows.numel())}
        if calib_name == eval_name:
            log("WARNING: calibration and evaluation read the same text: the perplexity is not held out")

    device = resolve_device(c.device)
    offload_to = device if c.offload == "cpu" else None
    dtype = None if c.dtype == "auto" else models.io.DTYPES[c.dtype]
    model, tokenizer, source = load_causal_lm(shown, dtype=dtype, resolved=resolved, mmap=c.offload == "none")
    check(not c.heal_checkpointing or getattr(model, "supports_gradient_checkpointing", False),
          f"--heal-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    dtype_name = models.io.model_dtype_name(model)
    lm_prefix = language_model_prefix(model)
    include = c.include or ([rf"^{re.escape(lm_prefix)}\."] if lm_prefix else [])
    targets = find_targets(model, include, c.exclude, conv1d=True)
    check(targets, "no target layers found in the model (check --include/--exclude)")
    if lm_prefix and not c.include:
        log(f"  {type(model).__name__}: only its language model ({lm_prefix}) is compressed; the vision tower "
            "and projector stay dense")
    check_targets(model, targets)
    shapes = {n: linear_shape(get_module(model, n)) for n in targets}
    # a quantizing method's grid and ranks follow from the shapes: its budget errors come before any work
    quant, global_plan = getattr(method, "quant", None) if not hasattr(method, "resolve") else None, False
    if hasattr(method, "resolve"):
        method.resolve(c.keep, shapes)
        quant = method.quant
        if method.options.byte_plan == "auto":  # global where its full backward is allowed (not under --offload)
            method.options.byte_plan = "uniform" if c.offload != "none" else "global"
            if c.offload != "none":
                log("  --byte-plan auto: uniform under --offload (the global plan's output sensitivity needs a "
                    "backward through the whole model)")
        c.method_options = {**c.method_options, "byte_plan": method.options.byte_plan}
        global_plan = method.options.byte_plan == "global"
    if global_plan:
        grids = check_byte_plan(method, c.keep, shapes)
        given = dict(zip(("bits", "group_size"), method.given))  # the recipe re-runs the same choice of grids
        c.method_options = {**{k: v for k, v in c.method_options.items() if k not in given},
                            **{k: v for k, v in given.items() if v is not None}}
    elif quant:  # quantization (+ correction): the ranks follow from the byte budget; the recipe records the grid
        c.method_options = {**c.method_options, "bits": quant.bits, "group_size": quant.group_size,
                            "zero_point": quant.zero_point}
        ranks = quant_ranks(shapes, c.keep if method.corrects else None, quant,
                            elem_bytes=next(model.parameters()).element_size())
    bytes_before, bytes_what = source_bytes(resolved, model)
    if c.offload == "none":
        model.to(device)
    log(f"[{c.method}] {type(model).__name__} from {source} ({dtype_name}): {len(targets)} target layers in the "
        f"decoder blocks (embeddings and LM head untouched)")
    for k, v in text_info.items():
        log(f"  {k}: {v['source']}, {v['tokens']:,} tokens" + (f" ({v['windows']} windows of {v['window_tokens']})"
                                                                 if "windows" in v else ""))

    # every dense measurement now, on the one model: no copy of it is kept
    scores: dict[str, dict[str, Any]] = {}
    samples: dict[str, str] = {}
    with dispatched(model, device, c.offload) as dmap:
        if c.offload != "none":
            log(f"  offload: {len(offloaded(dmap))} of {len(dmap)} device-map entries on the CPU for evaluation; "
                f"blocks visit {device} one at a time for calibration")
        scores["dense"] = ppl(model, eval_ids, c, log, "dense", bos)
        samples["dense"] = greedy_sample(model, tokenizer)
        prompts = PROMPTS[: c.generation_prompts]
        generation = {"dense": continuations(model, tokenizer, prompts)} if prompts else {}
        timed = c.latency and not offloaded(dmap)  # offloaded weights would time the transfers
        dense_speed = evaluate.speed(model, c, "dense") if timed else None
        dense_flops = flops_per_token(model, c.seq_len)
    groups_before = param_groups(model, targets)
    dense_params = models.count_params(model)

    batches = token_batches(windows, max(1, min(8, c.batch_size)), device) if windows is not None else []
    spectra = gram_dir = None
    if getattr(method, "output_side", False):  # kfac: the output side of every fit, from the dense model
        from .gradients import method_output_grams

        gram_dir = method_output_grams(method, model, targets, shapes, batches, log)
    try:
        if c.rank is None and c.rank_policy == "global":
            log(f"  scaled spectra of every target (dense model) for the global rank plan ("
                f"{'K-FAC loss estimates' if getattr(method, 'output_side', False) else c.global_score})")
            spectra = scaled_spectra(model, targets, method, batches, log, c.global_score, offload_to=offload_to)
        if global_plan:  # grids and correction ranks in one byte budget
            ranks, quant = byte_plan_targets(model, targets, method, batches, c.keep, shapes, log,
                                             next(model.parameters()).element_size(), grids)
        elif not quant:
            ranks = plan_ranks(c, shapes, spectra, loss_units=getattr(method, "output_side", False))
        del spectra
        if c.heal_steps and c.offload != "none":
            fits, need, budget = heal_fits(model, shapes, ranks, device)
            check(fits, f"--heal-steps needs the compressed model on the GPUs: {need / 2**30:.1f} GiB of weights, "
                        f"{budget / 2**30:.1f} GiB allowed for them ({GPU_SHARE['train']:.0%} of the free memory, the rest "
                        "for gradients, optimizer state and activations): use more GPUs or --heal-steps 0")
        past = [] if quant else [n for n, k in ranks.items() if k > break_even_rank(*shapes[n])]
        if past:
            log(f"WARNING: {len(past)} matrices are past their break-even rank (the factors outweigh the dense "
                f"matrix), e.g. {past[0]}")
        mode = getattr(method.options, "sequential", "none")
        log(f"  factorizing ({'calibration order: ' + mode if method.calibrated else 'no calibration'}, "
            f"{c.rank_policy if c.rank is None else 'fixed'} ranks "
            f"{min(ranks.values())}-{max(ranks.values())})")
        t0 = time.perf_counter()
        dense_layers = {} if c.heal_steps and c.heal_loss == "distill" else None
        refine = RefineSpec(c.refine_steps, c.refine_lr, c.refine_params) if c.refine_steps else None
        metrics = None
        if refine is not None and c.refine_loss == "fisher":  # the blocks' output metrics, on the dense model
            from .calibrate import decoder_blocks
            from .gradients import block_output_metrics

            t1 = time.perf_counter()
            blocks_name, blocks = decoder_blocks(model, targets)
            metrics = block_output_metrics(model, blocks_name, len(blocks), batches,
                                           max_batches=int(getattr(method.options, "grad_batches", 4)))
            log(f"  --refine-loss fisher: output-gradient metrics of {len(blocks)} blocks, "
                f"{time.perf_counter() - t1:.0f}s")
        info = factorize(model, targets, ranks, method, batches, mode=mode, log=log, keep_dense=dense_layers,
                         offload_to=offload_to, quant=quant, refine=refine, refine_metrics=metrics)
        del metrics
        info["factorize_seconds"] = round(time.perf_counter() - t0, 1)
    finally:  # the output-gradient Grams (4 sum out^2 bytes) are not kept past the fits, on disk or in memory
        method.output_grams = None
        if gram_dir is not None:
            gram_dir.cleanup()
    del batches
    with dispatched(model, device, c.offload, train=bool(c.heal_steps)):
        scores["oneshot"] = ppl(model, eval_ids, c, log, "one-shot", bos)
        if c.heal_steps:
            heal_windows = with_bos(calibration_blocks(calib_ids, c.seq_len - (bos is not None), c.heal_samples,
                                                       c.seed + 1), bos)
            info["heal"] = heal(model, heal_windows, c, log, dense=dense_layers, device=device,
                                measure=lambda: ppl(model, eval_ids, c, log, "healing", bos))
            del dense_layers
            scores["healed"] = ppl(model, eval_ids, c, log, "healed", bos)
        scores["final"] = dict(scores["healed" if c.heal_steps else "oneshot"])
        samples["final"] = greedy_sample(model, tokenizer)
        if prompts:
            generation["final"] = continuations(model, tokenizer, prompts)
        final_flops = flops_per_token(model, c.seq_len)

    groups_after = param_groups(model, targets)
    tw_after = sum(get_module(model, n).weight_params() for n in targets)
    # a quantized target's codes (and int8 factors) are buffers, not parameters: counted as its weights here
    unparam = sum(get_module(model, n).buffered_weights() for n in targets) if quant else 0
    acc = Accounting(target_weights_before=groups_before["targets"], target_weights_after=tw_after,
                     model_params_before=dense_params,
                     model_params_after=models.count_params(model) + unparam).to_dict()
    acc["parts_before"], acc["parts_after"] = groups_before, groups_after
    acc["svd_llm_ratio"] = round(1 - acc["target_ratio"], 4)
    acc["bytes_before"], acc["bytes_before_is"] = bytes_before, bytes_what
    acc["bytes_after"] = tensor_bytes(model)  # the saved tensors in the model's dtype (file sizes: bytes_on_disk)
    if quant:
        acc["quantized"] = describe_quant(quant, dtype_name)
        acc["svd_llm_ratio"] = None
    acc["target_bytes_after"] = sum(target_bytes(get_module(model, n)) for n in targets)
    acc["target_bytes_vs_bf16"] = round(acc["target_bytes_after"] / (2 * groups_before["targets"]), 4)
    acc["dtype"] = dtype_name
    flops = {"dense": dense_flops, "final": final_flops, "unit": "per token",
             "context": c.seq_len}
    ratio = scores["final"]["perplexity"] / scores["dense"]["perplexity"]
    warnings = []
    if not math.isfinite(scores["final"]["perplexity"]) or ratio > 100:
        warnings.append(f"the compressed model's perplexity is {ratio:.3g}x the dense model's: it has lost the language")
    looping = loop_warning(generation["dense"], generation["final"]) if generation else None
    if looping:
        warnings.append(looping)
    for w in warnings:
        log(f"WARNING: {w}")
    info.update(ranks=ranks, samples=samples, generation=generation, text=text_info, rank_policy=c.rank_policy if c.rank is None else "fixed",
                sequential=mode if method.calibrated else None, perplexity_ratio=round(ratio, 4), dtype=dtype_name,
                device=str(device), offload=c.offload)
    report = Report(str(out) if out else None, TASK, c.method, METRIC, scores, acc, flops, c.heal_steps, info,
                    warnings=warnings, health={"lost_language": not math.isfinite(scores["final"]["perplexity"]) or ratio > 100,
                                              "loops": bool(looping)}, latency={})
    report.model = model
    meta = {"task": TASK, "method": c.method, "structure": "lowrank", "base_model": source,
            "recipe": c.to_dict(), "method_info": info, "scores": scores, "accounting": acc,
            "flops_per_token": flops, "latency": {}, "warnings": warnings, "health": report.health}
    if save:  # the model first: what follows is optional and may fail without losing it
        saving.save_model(model, out, tokenizer=tokenizer, meta=meta, overwrite=c.overwrite)
        saving.copy_processor_files(resolved, out)
        if c.offload == "none":
            model.to(device)
        acc["bytes_on_disk"] = saving.weight_bytes(out)
        saving.record(Path(out), ["accounting", "bytes_on_disk"], acc["bytes_on_disk"])
        log(f"saved to {out}")
    if dense_speed is not None:
        with dispatched(model, device, c.offload):
            compressed_speed = evaluate.speed(model, c, "compressed")
        report.latency = evaluate.speed_report(dense_speed, compressed_speed, dtype_name, log)
        if save:
            saving.record(Path(out), ["latency"], report.latency)
    info["seconds"] = round(time.perf_counter() - t_start, 1)
    if save:
        saving.record(Path(out), ["method_info", "seconds"], info["seconds"])
        saving.add_png(Path(out), log)
    return report


def evaluate_lm(path: str, config: RunConfig, *, quiet: bool = False, dtype: str | None = None) -> dict[str, Any]:
    """Perplexity of a saved (or any) causal LM on ``config.eval_text`` with its recorded window settings."""
    from ..data.text import DEFAULT_EVAL, bos_token, describe, token_stream
    from .evaluate import eval_window
    from .load import load_causal_lm, load_tokenizer, model_context, resolve_causal_model

    log = Log(quiet)
    c = config.validate()
    name, docs = _text(c.eval_text, DEFAULT_EVAL, "evaluation")
    resolved = resolve_causal_model(path, cache_dir=c.cache_dir)
    tokenizer = load_tokenizer(resolved, path)
    bos = bos_token(tokenizer, c.bos)
    c.eval_seq_len = eval_window(c, model_context(resolved))
    ids = token_stream(tokenizer, docs)
    if c.eval_max_tokens:
        ids = ids[: c.eval_max_tokens]
    check_eval_tokens(ids, c, name)
    # a factorlm folder is scored in the dtype it was saved in (as its recorded final score), unless --dtype
    model, tokenizer, source = load_causal_lm(path, resolved=resolved,
                                              dtype=None if dtype in (None, "auto") else models.io.DTYPES[dtype])
    log(f"evaluating {source} on {name} ({len(ids):,} tokens)")
    r = ppl(model, ids, c, log, "model", bos)
    return {**r, "text": describe(name, ids)}
