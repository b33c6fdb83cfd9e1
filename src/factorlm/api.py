"""The Python API behind the CLI: finetune, compress, evaluate, info.

    from factorlm import RunConfig, compress, load
    report = compress(RunConfig(task="sst2", data_dir="glue/", method="svd", keep=0.25, output="out"))
    model = load("out")                      # a transformers model, callable as model(input_ids=...)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import models
from .config import RunConfig
from .errors import FactorLMError, check
from .models.loading import FACTORLM_JSON, read_meta, resolve_model
from .session import Session


# -- loading a model for a task -------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def load_model_for_task(name_or_path: str | None, task, seed: int | None = None,
                        keep_dtype: bool = False, max_length: int | None = None) -> tuple[nn.Module, Any, bool]:
    """``(model, tokenizer, trained_for_task)`` from a factorlm folder, an HF folder or a hub id.

    A plain encoder (no task head, e.g. the embedded MiniLM) gets a fresh classification head
    with ``task.num_labels`` outputs (QA tasks: a span head, ``AutoModelForQuestionAnswering``),
    initialised from ``seed`` (every RNG is seeded right before the model is built, so the head
    follows ``--seed``); ``trained_for_task`` is True only when a head of the right shape was loaded
    (or a factorlm folder says it was trained on this very task).  ``max_length`` (the run's
    ``--max-length``) is checked against the model's position limit.
    """
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model(name_or_path)
    meta = read_meta(path) if Path(path).is_dir() else None
    try:
        from .models.hub_folder import tokenizer_kwargs

        tokenizer = AutoTokenizer.from_pretrained(path, **(tokenizer_kwargs(path) if meta is not None else {}))
    except Exception as e:  # noqa: BLE001
        raise FactorLMError(f"cannot load a tokenizer from {path!r}: {_first_line(e)}") from None
    if meta is not None:  # a factorlm folder: trained from in fp32, evaluated in its saved dtype
        model = models.load(path, dtype=None if keep_dtype else "fp32")
        n = getattr(model.config, "num_labels", None)
        is_span = type(model).__name__.endswith("ForQuestionAnswering")
        if is_span != task.is_qa:
            raise FactorLMError(f"{path} is a {type(model).__name__}; task {task.name!r} needs "
                                + ("a span (question answering) head" if task.is_qa else "a classification head"))
        if n != task.num_labels:
            raise FactorLMError(f"{path} has {n} labels but task {task.name!r} needs {task.num_labels}")
        _ensure_padding(model, tokenizer, path)
        _check_max_length(model, tokenizer, max_length, path)
        return model, tokenizer, meta.get("task") == task.name
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise FactorLMError(f"cannot load model {path!r}: {_first_line(e)}") from None
    kwargs: dict[str, Any] = {"num_labels": task.num_labels}  # QA: 2 (start, end), whatever the checkpoint had
    auto = AutoModelForQuestionAnswering if task.is_qa else AutoModelForSequenceClassification
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    if task.label_names and len(task.label_names) == task.num_labels and not task.is_qa:
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {v: k for k, v in enumerate(task.label_names)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is our message to give
    if seed is not None:
        from accelerate.utils import set_seed

        set_seed(seed)
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except ValueError as e:
        what = "question-answering" if task.is_qa else "sequence-classification"
        raise FactorLMError(
            f"model type {getattr(config, 'model_type', '?')!r} has no {what} class in transformers: {_first_line(e)}"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise FactorLMError(f"cannot load model {path!r}: {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    trained = not info.get("missing_keys") and not info.get("mismatched_keys")
    models.check_finite(model, f"model {path}")
    _ensure_padding(model, tokenizer, path)
    _check_max_length(model, tokenizer, max_length, path)
    return model, tokenizer, trained


def _check_max_length(model: nn.Module, tokenizer, max_length: int | None, path: str) -> None:
    """``--max-length`` beyond the model's positions would fail mid-run with an index error: say so now."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    if max_length is not None and limits and max_length > min(limits):
        raise FactorLMError(f"--max-length {max_length} is longer than {path} can read ({min(limits)} tokens); "
                            f"use --max-length {min(limits)} or less")


def _ensure_padding(model: nn.Module, tokenizer, path: str) -> None:
    """Batches are padded, and a decoder used as a classifier pools its last non-padding token, so
    both the tokenizer and the model config need a pad token: decoders often ship without one, and
    then the end-of-sequence token is used (the usual choice; it is saved with the model)."""
    if getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise FactorLMError(f"the tokenizer of {path} has neither a pad nor an end-of-sequence token; "
                                "add a pad token to it")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


# -- the dense teacher ----------------------------------------------------------------------------
def cache_root(config: RunConfig) -> Path:
    root = config.cache_dir or os.environ.get("FACTORLM_CACHE") or Path.home() / ".cache" / "factorlm"
    return Path(root).expanduser()


def _teacher_key(session: Session, source: str) -> str:
    c = session.config
    ident = {
        "model": source, "task": c.task, "data_dir": c.data_dir, "train_file": c.train_file, "dev_file": c.dev_file,
        "text_columns": c.text_columns, "label_column": c.label_column, "max_length": c.max_length,
        "max_train_samples": c.max_train_samples, "max_eval_samples": c.max_eval_samples,
        "batch_size": c.batch_size, "seed": c.seed, "epochs": c.teacher_epochs or c.epochs,
        "selection_size": c.selection_size, "selection_examples": len(session.data.select),
        "lr": c.teacher_learning_rate or c.learning_rate, "max_steps": c.max_steps, "warmup": c.warmup_ratio,
        "weight_decay": c.weight_decay,
    }
    # training options added later enter the key only when set, so existing teacher caches stay valid
    if c.mixed_precision != "no":
        ident["mixed_precision"] = c.mixed_precision
    if c.group_by_length and not session.task.is_qa:  # QA windows are not length-grouped
        ident["group_by_length"] = True
    if session.task.is_qa:  # the windows, and the post-processing keep-best's F1 (and v2's threshold) depend on
        ident.update(split_by_article=c.split_by_article, doc_stride=c.doc_stride, n_best=c.n_best,
                     max_answer_length=c.max_answer_length)
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_teacher(session: Session, validate=None) -> nn.Module:
    """A dense model fine-tuned on the task: the given one, a cached one, or one trained now.

    ``validate(model)`` runs right after loading, before any training (e.g. checks the budget fits).
    """
    c = session.config
    source = c.teacher or c.model
    model, tokenizer, trained = load_model_for_task(source, session.task, seed=c.seed, max_length=c.max_length)
    session.tokenizer = tokenizer
    if validate is not None:
        validate(model)
    label = source or "the embedded all-MiniLM-L6-v2"
    resolved = resolve_model(source)
    main = session.task.main_metric
    if trained:
        session.log(f"starting from {label}, already fine-tuned for {session.task.name}")
        session.evaluate(model, phase="dense")
        session.teacher = {"source": resolved, "trained_here": False, main: session.phases["dense"].get(main)}
        session.check_final(session.phases["dense"], what="dense teacher's")
        return model
    key = _teacher_key(session, resolved)
    cache = cache_root(c) / "teachers" / f"{session.task.name}-{key}"
    session.teacher = {"source": resolved, "cache": str(cache), "cache_key": key}
    if (cache / FACTORLM_JSON).is_file():
        session.log(f"{label} has no trained {session.task.name} head: using the cached dense teacher {cache}")
        model = models.load(cache)
        meta = read_meta(str(cache)) or {}
        scores = meta.get("scores", {}).get("dense")
        if scores:
            session.record("dense", scores, cached=True)
        else:
            session.evaluate(model, phase="dense")
        session.teacher.update({"trained_here": False, main: session.phases["dense"].get(main)})
        for w in meta.get("warnings") or []:  # a teacher's faults come back every time it is reused
            session._warn(f"(cached teacher) {w}")
        for flag in ("collapsed", "diverged"):
            if "dense" in (meta.get("health") or {}).get(flag, []):
                session.health[flag].append("dense")
        session.check_final(session.phases["dense"], what="dense teacher's")
        return model
    cache_ok = _writable_problem(cache) is None
    session.log(f"{label} has no trained {session.task.name} head: fine-tuning a dense teacher first "
                + (f"(cached at {cache})" if cache_ok else
                   f"(NOT cached: {_writable_problem(cache)}; set --cache-dir or $FACTORLM_CACHE)"))
    session.finetune(model, phase="dense", epochs=c.teacher_epochs, learning_rate=c.teacher_learning_rate)
    # the teacher's own warnings are replayed on reuse; the baseline check below is redone there, not replayed
    teacher_warnings = list(session.warnings)
    session.check_final(session.phases["dense"], what="dense teacher's")
    session.teacher.update({"trained_here": True, main: session.phases["dense"].get(main)})
    if not cache_ok:
        session.teacher["cache"] = None
    elif session.accelerator.is_main_process:
        try:
            models.save(model, cache, tokenizer=tokenizer, overwrite=True, meta={
                "task": session.task.name, "method": "dense", "base_model": resolved,
                "recipe": c.to_dict(), "scores": {"dense": session.phases["dense"]},
                "warnings": teacher_warnings,  # replayed whenever the teacher is reused
                "health": {k: [p for p in v if p == "dense"] for k, v in session.health.items() if isinstance(v, list)},
            })
        except OSError as e:  # a cache that fails is not worth the run
            session.log(f"WARNING: could not cache the teacher at {cache}: {e}")
            session.teacher["cache"] = None
    session.accelerator.wait_for_everyone()  # no rank may look for the cache before it is complete
    return model


# -- reports --------------------------------------------------------------------------------------
@dataclass
class Report:
    output: str | None
    task: str
    method: str
    main_metric: str
    scores: dict[str, dict[str, Any]]  # phase -> metrics
    accounting: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    total_train_steps: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # method facts (e.g. RankDyna's per-matrix ranks)
    baseline: dict[str, float] = field(default_factory=dict)  # majority-class baseline on dev
    warnings: list[str] = field(default_factory=list)  # collapse, NaN loss, worse than start, ...
    health: dict[str, Any] = field(default_factory=dict)  # the same as flags
    teacher: dict[str, Any] | None = None  # the dense model the run started from (source, cache, score)
    latency: dict[str, Any] = field(default_factory=dict)  # measured: dense source vs compressed

    @property
    def final(self) -> float:
        from .train.evaluate import main_score

        return main_score(self.scores["final"], self.main_metric)

    @property
    def ok(self) -> bool:
        """False when the run collapsed, diverged or ended no better than the trivial baseline (the
        majority class; QA: the first words of the context)."""
        h = self.health
        return not (h.get("collapsed") or h.get("diverged") or h.get("below_baseline"))

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _writable_problem(folder: Path) -> str | None:
    """Why ``folder`` (created if missing, written via a temporary sibling) could not be written,
    or None.  Probes the nearest existing ancestor by creating and removing a temporary folder, so
    read-only and virtual file systems are caught, not only permission bits."""
    folder = Path(folder).expanduser().resolve()  # as atomic_dir will write it (symlinks followed)
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    anc = folder.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return f"{anc} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".factorlm-probe-", dir=anc))
    except OSError as e:
        return f"{anc} is not writable ({e.strerror or type(e).__name__})"
    return None


def _output_dir(c: RunConfig, default: str) -> Path:
    """The output folder, checked before any work: not an existing non-empty folder (unless
    ``--overwrite``), and creatable and writable (so a long run cannot fail at save time)."""
    out = Path(c.output or default).expanduser()
    if out.exists() and not c.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FactorLMError(f"output folder {out} already exists and is not empty (use --overwrite)")
    problem = _writable_problem(out)
    if problem:
        raise FactorLMError(f"cannot write the output folder {out}: {problem}")
    if c.checkpoint_dir:
        problem = _writable_problem(Path(c.checkpoint_dir) / "step-0")
        if problem:
            raise FactorLMError(f"cannot write checkpoints to {c.checkpoint_dir}: {problem}")
    return out


def _run_meta(session: Session) -> dict[str, Any]:
    """What every saved run records about its own trustworthiness, and the task's label spec (so
    `evaluate` needs only the dev file)."""
    t = session.task
    spec = {"name": t.name, "num_labels": t.num_labels, "main_metric": t.main_metric, "metrics": list(t.metrics),
            "label_names": list(t.label_names) if t.label_names else None,
            **{k: t.options[k] for k in ("label_kind", "text_columns", "label_column") if t.options.get(k)}}
    if t.is_qa:  # which articles each side holds (a split by article must never share one)
        titles = lambda ex: sorted({e.title for e in ex})  # noqa: E731
        spec["articles"] = {"train": titles(session.data.train), "select": titles(session.data.select),
                            **{s: titles(ex) for s, ex in session.data.evals.items()}}
        spec["questions"] = {"train": len(session.data.train), "select": len(session.data.select),
                             **{s: len(ex) for s, ex in session.data.evals.items()}}
    return {"task_spec": spec, "baseline": session.baseline, "warnings": list(session.warnings),
            "health": session.health, "teacher": getattr(session, "teacher", None),
            "selection": {"size": len(session.data.select), "from": "train",
                          "selection_size": session.config.selection_size}}


def _flops(model: nn.Module, seq_len: int) -> int:
    from .profiling import count_flops

    return count_flops(model, 1, seq_len)


def measure_latency(session: Session, dense: nn.Module, compressed: nn.Module) -> dict[str, Any]:
    """Dense source vs compressed forward latency, measured now in this process (see
    :func:`factorlm.profiling.compare_latency`), with the FLOP ratio at the same length beside it;
    ``{}`` with ``--no-latency``."""
    from .profiling import compare_latency
    from .summary import latency_lines

    from .profiling import bf16_native

    c = session.config
    if not c.latency or not session.accelerator.is_main_process:  # one process times (they share the machine)
        return {}
    seq = c.latency_seq or c.max_length
    device = next(compressed.parameters()).device
    deployed = "fp32" if c.dtype == "auto" else c.dtype
    dtypes = tuple(dict.fromkeys(("fp32", *(("bf16",) if bf16_native(device) else ()), deployed)))  # + the deployed one
    session.log(f"measuring latency: batch {c.latency_batch or 32} x {seq} tokens, {', '.join(dtypes)} (--no-latency skips it)")
    lat = compare_latency({"dense": dense, "compressed": compressed}, batch_size=c.latency_batch or 32, seq_len=seq,
                          dtypes=dtypes)
    lat["flop_ratio"] = round(_flops(dense, seq) / max(_flops(compressed, seq), 1), 3)
    for line in latency_lines(lat):
        session.log(line)
    return lat


def finetune(config: RunConfig, *, quiet: bool = False) -> Report:
    """Dense fine-tuning of a (pre-trained) model on the task: the usual starting point / teacher."""
    c = config.validate()
    out = _output_dir(c, f"runs/{c.task}-dense")
    session = Session(c, quiet=quiet)
    session.task, session.data  # noqa: B018 - fail early on bad task / data
    model, tokenizer, _ = load_model_for_task(c.model, session.task, seed=c.seed, max_length=c.max_length)
    session.tokenizer = tokenizer
    session.finetune(model, phase="final")
    session.check_final(session.phases["final"])
    flops = _flops(model, c.max_length)
    if session.accelerator.is_main_process:
        models.save(model, out, tokenizer=tokenizer, overwrite=c.overwrite, meta={
            "task": session.task.name, "method": "dense", "base_model": resolve_model(c.model),
            "recipe": c.to_dict(), "scores": {"dense": session.phases["final"], **session.phases},
            "params": models.count_params(model), "flops_per_sequence": flops, **_run_meta(session),
        })
    return Report(str(out), session.task.name, "dense", session.task.main_metric, session.phases,
                  flops={"final": flops}, total_train_steps=session.total_train_steps,
                  baseline=session.baseline, warnings=list(session.warnings), health=session.health)


def _budget_text(c: RunConfig) -> str:
    if c.ranks is not None:
        return f"the per-matrix ranks of {c.ranks}"
    return f"{c.keep}" if c.rank is None else f"rank {c.rank}"


def compress(config: RunConfig, *, quiet: bool = False, save: bool = True) -> Report:
    """Compress ``config.model`` on ``config.task`` with ``config.method``; save to ``config.output``.

    ``task="lm"``: one-shot compression of a causal LM, scored by perplexity (:mod:`factorlm.lm`)."""
    from .factorize import structure_class
    from .methods import get_method

    if config.task == "lm":
        from .lm import compress_lm

        return compress_lm(config, quiet=quiet, save=save)

    c = config.validate()
    method = get_method(c.method, c.method_options)  # bad method / option: fail before any work
    structure_class(c.structure)
    if c.skip_slow and not method.uses_plan:
        raise FactorLMError(f"--skip-slow applies to methods that factorize with a budget plan, not {method.name!r}")
    ranks = None
    if c.ranks is not None:
        from .ranks.explicit import read_ranks

        check(method.uses_plan, f"--ranks applies to methods that factorize with a rank plan (svd, fwsvd, lpaf), "
                                f"not {method.name!r}")
        c.ranks = str(Path(c.ranks).resolve())  # the recipe names the file wherever it is re-run from
        ranks = read_ranks(c.ranks)  # read once: the plan and the report use this, whatever the file becomes
    keep_tag = f"ranks-{Path(c.ranks).stem}" if c.ranks is not None else f"k{c.keep:g}" if c.rank is None else f"r{c.rank}"
    out = _output_dir(c, f"runs/{c.task}-{c.method}-{keep_tag}") if save else None
    session = Session(c, quiet=quiet)
    session.explicit_ranks = ranks
    method.validate(c, session.accelerator.num_processes)
    session.task, session.data  # noqa: B018

    def validate(m):  # budget / rank / patterns must fit this model before anything trains
        from .methods.common import plan_for, targets_for

        if c.rank_policy == "uniform" or c.rank is not None:
            plan_for(session, m, targets_for(session, m), speed_check=None if method.uses_plan else False)

    if method.needs_teacher:
        model = ensure_teacher(session, validate)
    else:
        model, tokenizer, _ = load_model_for_task(c.model, session.task, seed=c.seed, max_length=c.max_length)
        session.tokenizer = tokenizer
        validate(model)
    # the source, timed beside the result; kept on the CPU meanwhile (no second copy on an accelerator)
    dense_ref = copy.deepcopy(model).cpu() if c.latency and session.accelerator.is_main_process else None
    dense_flops = _flops(model, c.max_length)
    dense_params = models.count_params(model)
    session.log(f"[{method.name}] compressing {len(models.find_targets(model, c.include, c.exclude))} target layers "
                f"to keep {_budget_text(c)} ({c.structure})")
    result = method.run(session, model)
    if ranks is not None:  # the allocation itself, not only its path, goes into the report
        result.info.update(ranks_file=c.ranks, ranks=dict(ranks), dense=list(getattr(session, "plan_dense", [])))
    model = result.model
    if c.dtype not in ("fp32", "auto"):  # deployed in a lower precision: its score in it is the final one
        session.evaluate(model, phase="final_fp32")
        model.to(models.io.DTYPES[c.dtype])
    session.evaluate(model, phase="final")
    session.check_final(session.phases["final"])
    latency = measure_latency(session, dense_ref, model) if dense_ref is not None else {}
    del dense_ref
    flops = {"dense": dense_flops, "final": _flops(model, c.max_length)}
    accounting = result.accounting.to_dict() if result.accounting is not None else {}
    accounting.setdefault("model_params_before", dense_params)
    accounting["model_params_after"] = models.count_params(model)
    report = Report(str(out) if out else None, session.task.name, method.name, session.task.main_metric,
                    session.phases, accounting, flops, session.total_train_steps, result.info,
                    baseline=session.baseline, warnings=list(session.warnings), health=session.health,
                    teacher=session.teacher, latency=latency)
    report.model = model  # the compressed model itself (an attribute, not a serialized field)
    report.predictions = session.predictions.get("final")  # dev predictions per example (not serialized either)
    if save and session.accelerator.is_main_process:
        meta = {
            "task": session.task.name, "method": method.name, "structure": c.structure,
            "base_model": resolve_model(c.model),
            "recipe": c.to_dict(), "method_info": result.info, "scores": session.phases,
            "accounting": accounting, "flops_per_sequence": flops, "seq_len_for_flops": c.max_length,
            "total_train_steps": session.total_train_steps, "latency": latency,
            "speed_check": getattr(session, "speed_check", {}), **_run_meta(session),
        }
        extra = {**(result.extra_files or {}), "report.png": lambda dst: _report_png(session, meta, dst)}
        models.save(model, out, tokenizer=session.tokenizer, overwrite=c.overwrite, extra_files=extra, meta=meta)
        if (out / "report.png").is_file():
            session.log(f"the picture of this run: {out / 'report.png'}")
    return report


def _report_png(session: Session, meta: dict[str, Any], dst: Path) -> None:
    """The run's one-page picture; a plotting failure costs the picture, never the saved model."""
    from .plots import report_png

    try:
        report_png(meta, dst)
    except Exception as e:  # noqa: BLE001
        session.log(f"WARNING: could not draw {dst.name}: {_first_line(e)}")


# what `evaluate` reuses from a saved folder's recipe (flags override each); the file, column and
# data-dir settings only while the task is the recorded one
EVAL_DATA_FIELDS = ("task", "data_dir", "train_file", "dev_file", "text_columns", "label_column", "max_length",
                    "max_eval_samples", "eval_batch_size", "seed",
                    "split_by_article", "doc_stride", "max_answer_length", "n_best",  # QA
                    "eval_text", "seq_len", "eval_stride", "eval_max_tokens")  # the last four: --task lm
_TASK_DATA_FIELDS = ("data_dir", "train_file", "dev_file", "text_columns", "label_column", "split_by_article")


def evaluate_config(path: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The evaluation config of a saved folder: the data settings its ``factorlm.json`` recorded
    (:data:`EVAL_DATA_FIELDS`), then ``overrides`` (the user's flags) on top."""
    meta = read_meta(resolve_model(path)) or {}
    recipe = meta.get("recipe") or {}
    values: dict[str, Any] = {k: recipe[k] for k in EVAL_DATA_FIELDS if recipe.get(k) is not None}
    if meta.get("task") and "task" not in values:
        values["task"] = meta["task"]
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if overrides.get("task") not in (None, values.get("task")):  # another task: its own data settings
        for k in _TASK_DATA_FIELDS:
            values.pop(k, None)
    elif ("train_file" in overrides or "dev_file" in overrides) and "split_by_article" not in overrides:
        values.pop("split_by_article", None)  # a new file is scored whole unless the user splits it again
    values.update(overrides)
    values["model"] = path
    return RunConfig(**{k: v for k, v in values.items() if k in RunConfig.field_names()})


def _saved_task(session: Session, meta: dict[str, Any]):
    """A csv/jsonl task rebuilt from the label spec a saved folder recorded, so evaluation reads only
    the dev file (None: resolve the task as usual)."""
    from .data import resolve_task

    c, spec = session.config, meta.get("task_spec") or {}
    if not (c.dev_file and spec.get("label_kind") and spec.get("name") == c.task and c.task in ("csv", "jsonl")):
        return None
    return resolve_task(c.task, dev_file=c.dev_file, label_column=c.label_column or spec.get("label_column"),
                        text_columns=tuple(c.text_columns or spec.get("text_columns") or ()) or None,
                        num_labels=spec["num_labels"], label_kind=spec["label_kind"], label_names=spec.get("label_names"))


def evaluate_model(path: str, config: RunConfig, *, quiet: bool = False, split: str = "dev",
                   dtype: str | None = None, details: dict[str, Any] | None = None) -> dict[str, float]:
    """Evaluate a saved model (factorlm or HF folder) on ``config.task`` and one ``split`` (``dev``:
    the task's evaluation splits; ``test`` where the task has one), in the dtype it was saved in or
    ``dtype`` (fp32 / bf16 / fp16).  Reads no training data.  ``details`` (a dict), when given,
    receives the measured ``latency`` (vs the dense equivalent), ``baseline`` and ``warnings``."""
    from .data import load_task_data

    c = config.validate()
    session = Session(c, quiet=quiet)
    meta = read_meta(resolve_model(path)) or {}
    task = _saved_task(session, meta) or session.task
    session.task = task
    splits = tuple(task.eval_splits) if split == "dev" else (split,)
    if split == "train" or (split != "dev" and split not in task.available_splits):
        others = [x for x in task.available_splits if x not in ("train", *task.eval_splits)]
        raise FactorLMError(f"task {task.name!r} has no {split!r} split to evaluate (dev = {', '.join(task.eval_splits)}"
                            + (f"; other splits: {', '.join(others)})" if others else "; no other split)"))
    session.data = load_task_data(task, data_dir=c.data_dir, max_eval_samples=c.max_eval_samples, seed=c.seed,
                                  eval_splits=splits, include_train=False, split_by_article=c.split_by_article,
                                  **session._file_options())
    if task.is_qa and task.version_2:  # the null threshold chosen at training time, on its selection slice
        phases = [m for m in (meta.get("scores") or {}).values() if isinstance(m, dict) and "null_threshold" in m]
        session.fixed_null_threshold = float(phases[-1]["null_threshold"]) if phases else 0.0
        session.log(f"SQuAD 2.0 null threshold {session.fixed_null_threshold:g} "
                    + ("(chosen at training time on its selection slice)" if phases else "(none recorded: the usual 0)"))
    model, tokenizer, trained = load_model_for_task(path, task, keep_dtype=True, max_length=c.max_length)
    if dtype is not None:
        model.to(models.io.DTYPES[dtype])
    if not trained:
        if not meta:
            raise FactorLMError(f"{path} has no {'span' if task.is_qa else 'classification'} head trained for {task.name!r} "
                                f"({task.num_labels} labels): its scores would be those of a random head")
        session.log(f"note: {path} was trained on {meta.get('task')!r}, evaluated on {task.name!r}")
    session.tokenizer = tokenizer
    sizes = ", ".join(f"{s} {len(ex):,} examples" for s, ex in session.data.evals.items())
    session.log(f"evaluating {path} on {task.name}: {sizes} ({models.io.model_dtype_name(model)})")
    metrics = session.evaluate(model, phase=split)
    base = session.baseline
    if base:
        session.log(("trivial reader (first words of the context)" if task.is_qa else "majority-class baseline")
                    + " (of the evaluated split): "
                    + " ".join(f"{k}={v:.4f}" for k, v in base.items()))
    latency = {}
    if models.factorized_modules(model):  # timed against its dense equivalent (factors multiplied back)
        latency = measure_latency(session, models.densify(model), model)
    if details is not None:
        details.update(latency=latency, baseline=base, warnings=list(session.warnings))
    return metrics


def info(path: str) -> dict[str, Any]:
    """What a saved folder holds: method, task, parameters, per-module structure, scores, recipe."""
    p = resolve_model(path)
    meta = read_meta(p)
    if meta is None:
        raise FactorLMError(f"{path} is not a factorlm model folder (no {FACTORLM_JSON})")
    model = models.load(p)
    meta = dict(meta)
    # a quantized layer's codes (and int8 factors) are buffers: counted as its weights, as the report does
    from .layers.quantized import QuantLowRankLinear

    meta["params_total"] = models.count_params(model) + sum(
        m.buffered_weights() for m in model.modules() if isinstance(m, QuantLowRankLinear))
    return meta
