"""``--task lm``: one-shot low-rank compression of a causal language model, evaluated by perplexity.

    factorlm compress --task lm --model smollm2 --method whiten --keep 0.8 --rank-policy global

Steps (:func:`compress_lm`): read the calibration and evaluation text (before any model is loaded:
a missing file fails at once), load the causal LM (a folder, a hub id, a ``.gguf`` file converted once,
or the alias ``smollm2``), score the dense model (perplexity, a greedy sample), plan the ranks, factorize
every target of the decoder blocks with the method's input scaling while streaming the calibration
windows block by block (:mod:`factorlm.calibration`), optionally heal the factors with a few steps of
language-model fine-tuning, score again, time prefill and decode against the dense model, and save.

Targets: every ``nn.Linear`` (or GPT-2 ``Conv1D``) inside the decoder blocks; embeddings and the LM head
are never factorized.  ``--keep`` is the share of the target weights kept; SVD-LLM's "compression
ratio" is ``1 - keep`` (with the same share of every matrix: ``--rank-policy uniform``).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .config import RunConfig
from .errors import FactorLMError, check
from .layers.lowrank import LowRankLinear
from .models.surgery import find_targets, get_module, linear_shape, linear_weight, set_module

TASK = "lm"
METRIC = "perplexity"
SAMPLE_PROMPT = "The history of the United States"
SAMPLE_TOKENS = 24


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def check_config(c: RunConfig):
    """Everything about the settings that can be wrong, before any work (one-line errors)."""
    from .methods.oneshot_lm import LM_METHODS, get_lm_method

    check(c.method in LM_METHODS, f"--task lm takes --method {' | '.join(LM_METHODS.names())}, got {c.method!r}")
    method = get_lm_method(c.method, c.method_options)
    check(c.structure == "lowrank", f"--task lm factorizes into low rank only, got --structure {c.structure}")
    check(c.schedule == "oneshot", "--task lm is one-shot (calibrated layer by layer); --schedule staged does not apply")
    check(not c.skip_slow, "--skip-slow does not apply to --task lm yet")
    check(c.keep is not None or c.rank is not None, "give --keep or --rank")
    check(c.ranks is None, "--ranks does not apply to --task lm yet: give --keep or --rank")
    return method


def _text(source: str | None, default: str, what: str) -> tuple[str, list[str]]:
    from .data.text import read_documents

    name = source or default
    docs = read_documents(name)
    check(len(docs) > 0 and any(d.strip() for d in docs), f"{what} text {name} is empty")
    return name, docs


def _param_groups(model: nn.Module, targets: list[str]) -> dict[str, int]:
    """Exact parameter counts: the targets' weights (factors once factorized; their biases are not
    targets and count as "other"), embeddings, LM head (0 when tied to the embeddings), the rest."""
    seen: set[int] = set()
    counts = {"targets": 0, "embeddings": 0, "lm_head": 0, "other": 0}
    tset = set(targets)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        mod, _, leaf = name.rpartition(".")
        if mod in tset and leaf != "bias":
            counts["targets"] += p.numel()
        elif "embed" in name or "wte" in name or "wpe" in name:
            counts["embeddings"] += p.numel()
        elif "lm_head" in name:
            counts["lm_head"] += p.numel()
        else:
            counts["other"] += p.numel()
    return counts


def _flops_per_token(model: nn.Module, seq_len: int) -> int:
    from .profiling import count_flops

    return int(round(count_flops(model, 1, seq_len) / seq_len))


@torch.no_grad()
def greedy_sample(model: nn.Module, tokenizer, prompt: str = SAMPLE_PROMPT, new_tokens: int = SAMPLE_TOKENS) -> str:
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def plan_ranks(c: RunConfig, shapes: dict[str, tuple[int, int]], spectra: dict[str, torch.Tensor] | None) -> dict[str, int]:
    """``{target: rank}``: ``--rank``, the same share of every matrix (uniform), or global allocation."""
    from .ranks.allocator import global_rank_plan
    from .ranks.budget import break_even_rank, ratio_plan, round_rank

    if c.rank is not None:
        out = {}
        for n, (o, i) in shapes.items():
            check(c.rank <= min(o, i), f"--rank {c.rank} is larger than {n} ({o}x{i}) allows ({min(o, i)})")
            out[n] = c.rank
        return out
    if c.rank_policy == "uniform":
        return ratio_plan(shapes, c.keep, c.rank_multiple)
    # fisher: the spectra are already loss-weighted (comparable in absolute units); energy: each
    # matrix's relative error
    plan = global_rank_plan(spectra, shapes, c.keep, "none" if c.global_score == "fisher" else "energy")
    return {n: round_rank(k, c.rank_multiple, break_even_rank(*shapes[n])) for n, k in plan.items()}


def _spectra(model, targets, method, batches, mode_log, score: str = "energy") -> dict[str, torch.Tensor]:
    """Every target's scaled spectrum from the dense model (for the global plan); ``score="fisher"``
    multiplies each by ``sqrt(lambda)``, its output sensitivity (:func:`calibration.output_sensitivity`),
    so that a squared singular value estimates the loss its truncation costs."""
    from .calibration import output_sensitivity, stream
    from .decompose.whiten import scaled_spectrum

    spectra: dict[str, torch.Tensor] = {}
    if score == "fisher":
        lam = output_sensitivity(model, targets, batches)
        spectra = _spectra(model, targets, method, batches, mode_log)
        return {n: sv * lam[n] ** 0.5 for n, sv in spectra.items()}
    if not method.calibrated:
        for n in targets:
            spectra[n] = scaled_spectrum(linear_weight(get_module(model, n)).detach(), None)
        return spectra

    def on_group(i, names, stats):
        scale = method.scale(stats)
        for n in names:
            spectra[n] = scaled_spectrum(linear_weight(get_module(model, n)).detach(), scale)

    stream(model, targets, batches, method.make_stats, on_group, mode="none", log=mode_log)
    return spectra


def factorize(model: nn.Module, targets: list[str], ranks: dict[str, int], method, batches, *,
              mode: str, log=None) -> dict[str, Any]:
    """Replace every target by its rank-``ranks[name]`` :class:`LowRankLinear` (in place); returns
    per-target facts (rank, share of the scaled spectrum's energy discarded) and the stream's work."""
    from .calibration import stream
    from .decompose.whiten import factors_from_basis, scaled_factors

    facts: dict[str, dict[str, Any]] = {}

    def replace(names, scale):
        for n in names:
            m = get_module(model, n)
            W = linear_weight(m).detach()
            U, sigma = scaled_factors(W, scale)
            k = ranks[n]
            A, B = factors_from_basis(W, U, k)
            energy = sigma.pow(2)
            lost = float(energy[k:].sum() / energy.sum()) if energy.sum() > 0 else 0.0
            bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
            set_module(model, n, LowRankLinear.from_factors(A.contiguous(), B.contiguous(), bias))
            facts[n] = {"rank": k, "shape": list(W.shape), "energy_lost": round(lost, 6)}

    work: dict[str, Any] = {}
    if not method.calibrated:
        replace(targets, None)
        return {"modules": facts, "calibration": work}
    prog = stream(model, targets, batches, method.make_stats,
                  lambda i, names, stats: replace(names, method.scale(stats)), mode=mode, log=log)
    work = {"blocks": prog.blocks, "groups": prog.groups, "block_forwards": prog.forwards, "tokens": prog.tokens,
            "groups_of_block_0": prog.group_names[: prog.groups // max(prog.blocks, 1)]}
    return {"modules": facts, "calibration": work}


def heal(model: nn.Module, windows: torch.Tensor, c: RunConfig, log, teacher: nn.Module | None = None) -> dict[str, Any]:
    """``--heal-steps`` optimizer steps on calibration-text windows through the project's training loop
    (:class:`factorlm.train.loop.Trainer`: accelerate, ``--mixed-precision``): next-token loss
    (``--heal-loss lm``) or the KL divergence to ``teacher``'s (the dense model's) next-token
    distribution at every position (``distill``).  Only the factors train unless ``--heal-params all``.
    The last weights are kept (no selection)."""
    from torch.utils.data import DataLoader, TensorDataset

    from .train.distill import DistillationCallback
    from .train.loop import TrainConfig, Trainer

    frozen = {}
    for name, p in model.named_parameters():
        frozen[name] = p.requires_grad
        is_factor = name.endswith(".A") or name.endswith(".B")
        p.requires_grad_(c.heal_params == "all" or is_factor)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class _Windows(TensorDataset):
        def __getitem__(self, i):
            ids = self.tensors[0][i]
            return {"input_ids": ids, "labels": ids}

    g = torch.Generator().manual_seed(c.seed)
    loader = DataLoader(_Windows(windows), batch_size=min(c.batch_size, len(windows)), shuffle=True, generator=g)

    class _Task:  # no evaluation during healing: the last weights are kept
        name, main_metric, is_regression = TASK, METRIC, False

    cfg = TrainConfig(learning_rate=c.learning_rate, weight_decay=0.0, max_steps=c.heal_steps,
                      warmup_ratio=c.warmup_ratio, seed=c.seed, mixed_precision=c.mixed_precision,
                      keep_best=False, progress=c.progress, name="heal", batch_size=c.batch_size)
    callbacks = []
    if c.heal_loss == "distill":
        check(teacher is not None, "--heal-loss distill needs the dense model")
        callbacks.append(DistillationCallback(teacher, alpha=1.0, temperature=1.0, scale_task_loss=True))
    what = "next-token loss" if c.heal_loss == "lm" else "KL to the dense model"
    log(f"[heal] {c.heal_steps} steps of {what} on {len(windows)} windows of calibration text (batch "
        f"{loader.batch_size}), {trainable:,} trainable parameters ({c.heal_params}), lr {c.learning_rate:g}")
    t0 = time.perf_counter()
    model.train()
    trainer = Trainer(model, loader, None, _Task(), cfg, callbacks=callbacks, log=log)
    try:
        trainer.fit()
        stopped = trainer.state.stopped
    finally:
        trainer.close()
    model.eval()
    for name, p in model.named_parameters():
        p.requires_grad_(frozen.get(name, True))
    if teacher is not None:
        teacher.cpu()
    return {"steps": c.heal_steps, "loss": c.heal_loss, "windows": len(windows), "trainable_params": trainable,
            "params": c.heal_params,
            "learning_rate": c.learning_rate, "seconds": round(time.perf_counter() - t0, 1),
            **({"stopped": stopped} if stopped else {})}


def _ppl(model, ids, c: RunConfig, log, what: str) -> dict[str, Any]:
    from .train.perplexity import perplexity

    t0 = time.perf_counter()
    r = perplexity(model, ids, seq_len=c.seq_len, stride=c.eval_stride, batch_size=max(1, c.eval_batch_size // 16))
    r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    log(f"  {what}: perplexity {r['perplexity']:.3f} ({r['tokens_scored']:,} tokens, windows of {r['seq_len']}, "
        f"stride {r['stride']}; {time.perf_counter() - t0:.0f}s)")
    return r


def compress_lm(config: RunConfig, *, quiet: bool = False, save: bool = True):
    """Compress a causal LM one-shot (see the module docstring); returns an :class:`factorlm.api.Report`."""
    from accelerate.utils import set_seed

    from .api import Report, _output_dir
    from .calibration import token_batches
    from .data.text import DEFAULT_CALIBRATION, DEFAULT_EVAL, calibration_blocks, describe, token_stream
    from .models.causal import SMOLLM2, load_causal_lm
    from .ranks.budget import Accounting, break_even_rank

    c = config.validate()
    method = check_config(c)
    log = _Log(quiet)
    keep_tag = f"k{c.keep:g}" if c.rank is None else f"r{c.rank}"
    out = _output_dir(c, f"runs/lm-{c.method}-{keep_tag}") if save else None
    calib_name, calib_docs = _text(c.calibration, DEFAULT_CALIBRATION, "calibration") if method.calibrated or c.heal_steps \
        else (None, [])
    eval_name, eval_docs = _text(c.eval_text, DEFAULT_EVAL, "evaluation")
    set_seed(c.seed)
    t_start = time.perf_counter()

    model, tokenizer, source = load_causal_lm(c.model or SMOLLM2, cache_dir=c.cache_dir)
    targets = find_targets(model, c.include, c.exclude, conv1d=True)
    check(targets, "no target layers found in the model (check --include/--exclude)")
    shapes = {n: linear_shape(get_module(model, n)) for n in targets}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    eval_ids = token_stream(tokenizer, eval_docs)
    if c.eval_max_tokens:
        eval_ids = eval_ids[: c.eval_max_tokens]
    text_info = {"evaluation": describe(eval_name, eval_ids)}
    windows = None
    if calib_docs:
        calib_ids = token_stream(tokenizer, calib_docs)
        windows = calibration_blocks(calib_ids, c.seq_len, c.calibration_samples, c.seed)
        text_info["calibration"] = {**describe(calib_name, calib_ids), "windows": int(windows.shape[0]),
                                    "window_tokens": c.seq_len, "tokens": int(windows.numel())}
        if calib_name == eval_name:
            log("WARNING: calibration and evaluation read the same text: the perplexity is not held out")
    log(f"[{c.method}] {type(model).__name__} from {source}: {len(targets)} target layers in the decoder blocks "
        f"(embeddings and LM head untouched)")
    for k, v in text_info.items():
        log(f"  {k}: {v['source']}, {v['tokens']:,} tokens" + (f" ({v['windows']} windows of {v['window_tokens']})"
                                                                 if "windows" in v else ""))

    scores: dict[str, dict[str, Any]] = {}
    samples: dict[str, str] = {}
    scores["dense"] = _ppl(model, eval_ids, c, log, "dense")
    samples["dense"] = greedy_sample(model, tokenizer)
    groups_before = _param_groups(model, targets)
    dense_params = models.count_params(model)
    dense_flops = _flops_per_token(model, c.seq_len)
    # the dense model, kept on the CPU: timed beside the result, and the teacher of --heal-loss distill
    dense_ref = copy.deepcopy(model).cpu() if c.latency or (c.heal_steps and c.heal_loss == "distill") else None

    batches = token_batches(windows, max(1, min(8, c.batch_size)), device) if windows is not None else []
    spectra = None
    if c.rank is None and c.rank_policy == "global":
        log(f"  scaled spectra of every target (dense model) for the global rank plan ({c.global_score})")
        spectra = _spectra(model, targets, method, batches, log, c.global_score)
    ranks = plan_ranks(c, shapes, spectra)
    past = [n for n, k in ranks.items() if k > break_even_rank(*shapes[n])]
    if past:
        log(f"WARNING: {len(past)} matrices are past their break-even rank (the factors outweigh the dense "
            f"matrix), e.g. {past[0]}")
    mode = getattr(method.options, "sequential", "none")
    log(f"  factorizing ({'calibration order: ' + mode if method.calibrated else 'no calibration'}, "
        f"{c.rank_policy if c.rank is None else 'fixed'} ranks "
        f"{min(ranks.values())}-{max(ranks.values())})")
    t0 = time.perf_counter()
    info = factorize(model, targets, ranks, method, batches, mode=mode, log=log)
    info["factorize_seconds"] = round(time.perf_counter() - t0, 1)
    del batches
    scores["oneshot"] = _ppl(model, eval_ids, c, log, "one-shot")
    if c.heal_steps:
        heal_windows = calibration_blocks(calib_ids, c.seq_len, c.heal_samples, c.seed + 1)
        info["heal"] = heal(model, heal_windows, c, log, teacher=dense_ref)
        scores["healed"] = _ppl(model, eval_ids, c, log, "healed")
    if c.dtype != "fp32":
        scores["final_fp32"] = dict(scores["healed" if c.heal_steps else "oneshot"])
        model.to(models.io.DTYPES[c.dtype])
        scores["final"] = _ppl(model, eval_ids, c, log, f"final ({c.dtype})")
    else:
        scores["final"] = dict(scores["healed" if c.heal_steps else "oneshot"])
    samples["final"] = greedy_sample(model, tokenizer)

    groups_after = _param_groups(model, targets)
    tw_after = sum(get_module(model, n).weight_params() for n in targets)
    acc = Accounting(target_weights_before=groups_before["targets"], target_weights_after=tw_after,
                     model_params_before=dense_params, model_params_after=models.count_params(model)).to_dict()
    acc["parts_before"], acc["parts_after"] = groups_before, groups_after
    acc["svd_llm_ratio"] = round(1 - acc["target_ratio"], 4)
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    acc["bytes_before"] = dense_params * 4  # the dense source, fp32
    acc["bytes_after"] = acc["model_params_after"] * elem  # in the saved dtype (--dtype)
    flops = {"dense": dense_flops, "final": _flops_per_token(model, c.seq_len), "unit": "per token",
             "context": c.seq_len}

    latency = {}
    if dense_ref is not None and c.latency:
        latency = measure_generation(dense_ref, model, log)
    del dense_ref
    ratio = scores["final"]["perplexity"] / scores["dense"]["perplexity"]
    warnings = []
    if not math.isfinite(scores["final"]["perplexity"]) or ratio > 100:
        warnings.append(f"the compressed model's perplexity is {ratio:.3g}x the dense model's: it has lost the language")
    for w in warnings:
        log(f"WARNING: {w}")
    info.update(ranks=ranks, samples=samples, text=text_info, seconds=round(time.perf_counter() - t_start, 1),
                rank_policy=c.rank_policy if c.rank is None else "fixed", sequential=mode if method.calibrated else None,
                perplexity_ratio=round(ratio, 4))
    report = Report(str(out) if out else None, TASK, c.method, METRIC, scores, acc, flops, c.heal_steps, info,
                    warnings=warnings, health={"lost_language": bool(warnings)}, latency=latency)
    report.model = model
    if save:
        meta = {"task": TASK, "method": c.method, "structure": "lowrank", "base_model": source,
                "recipe": c.to_dict(), "method_info": info, "scores": scores, "accounting": acc,
                "flops_per_token": flops, "latency": latency, "warnings": warnings, "health": report.health}
        models.save(model.cpu() if device.type != "cpu" else model, out, tokenizer=tokenizer,
                    overwrite=c.overwrite, meta=meta, extra_files={"report.png": lambda dst: _png(meta, dst, log)})
        acc["bytes_on_disk"] = (Path(out) / models.io.WEIGHTS_NAME).stat().st_size
        _record(Path(out), ["accounting", "bytes_on_disk"], acc["bytes_on_disk"])
        log(f"saved to {out}")
    return report


def _record(folder: Path, keys: list[str], value) -> None:
    """Add one fact known only after saving (the file size) to ``factorlm.json`` (atomic replace)."""
    import json
    import os

    f = folder / models.loading.FACTORLM_JSON
    meta = json.loads(f.read_text())
    node = meta
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    tmp = f.with_name(f".{f.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.chmod(tmp, f.stat().st_mode & 0o777)
    os.replace(tmp, f)


def measure_generation(dense: nn.Module, compressed: nn.Module, log) -> dict[str, Any]:
    """Prefill and decode tokens/s, dense vs compressed, in the same process (fp32, and bf16 where native)."""
    from .lm_speed import generation_speed
    from .profiling import bf16_native

    device = next(compressed.parameters()).device
    out: dict[str, Any] = {}
    dtypes = ["fp32"] + (["bf16"] if bf16_native(device) else [])
    for dt in dtypes:
        d = copy.deepcopy(dense).to(device, models.io.DTYPES[dt])
        m = copy.deepcopy(compressed).to(device, models.io.DTYPES[dt])
        r = generation_speed({"dense": d, "compressed": m})
        del d, m
        out[dt] = r
        dn, cp = r["dense"], r["compressed"]
        log(f"  {dt}: prefill {dn['prefill_tokens_per_s']:,.0f} -> {cp['prefill_tokens_per_s']:,.0f} tokens/s "
            f"({cp['prefill_tokens_per_s'] / dn['prefill_tokens_per_s']:.2f}x), decode "
            f"{dn['decode_tokens_per_s']:,.1f} -> {cp['decode_tokens_per_s']:,.1f} tokens/s "
            f"({cp['decode_tokens_per_s'] / dn['decode_tokens_per_s']:.2f}x)")
    return out


def _png(meta: dict[str, Any], dst: Path, log) -> None:
    try:
        from .plots import lm_report_png

        lm_report_png(meta, dst)
    except Exception as e:  # noqa: BLE001 - a plotting failure costs the picture, never the model
        log(f"WARNING: could not draw {dst.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def evaluate_lm(path: str, config: RunConfig, *, quiet: bool = False, dtype: str | None = None) -> dict[str, Any]:
    """Perplexity of a saved (or any) causal LM on ``config.eval_text`` with its recorded window settings."""
    from .data.text import DEFAULT_EVAL, describe, token_stream
    from .models.causal import load_causal_lm

    log = _Log(quiet)
    c = config.validate()
    name, docs = _text(c.eval_text, DEFAULT_EVAL, "evaluation")
    # a factorlm folder is scored in the dtype it was saved in (as its recorded final score), unless --dtype
    model, tokenizer, source = load_causal_lm(path, cache_dir=c.cache_dir, dtype=None if dtype is None else models.io.DTYPES[dtype])
    ids = token_stream(tokenizer, docs)
    if c.eval_max_tokens:
        ids = ids[: c.eval_max_tokens]
    log(f"evaluating {source} on {name} ({len(ids):,} tokens)")
    r = _ppl(model, ids, c, log, "model")
    return {**r, "text": describe(name, ids)}
