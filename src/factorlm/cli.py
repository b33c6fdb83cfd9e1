"""``factorlm`` command line: a thin shell over :mod:`factorlm.api`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

from .cli_report import cmd_info as _cmd_info, print_report as _print_report
from .errors import FactorLMError

EPILOG = """examples:
  factorlm compress --method svd --keep 0.25                 # embedded MiniLM on rotten_tomatoes
  factorlm compress --task sst2 --data-dir ../glue --method fwsvd --keep 0.16 --output out/sst2-fw16
  factorlm finetune --model bert-base-uncased --task mrpc --output out/mrpc-dense
  factorlm evaluate out/sst2-fw16
  factorlm info out/sst2-fw16
  factorlm compress --task lm --model smollm2 --method whiten --keep 0.8   # a causal LM, one-shot
"""


def _common(p: argparse.ArgumentParser, *, train: bool = True) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="HF hub id or local folder (default: the embedded all-MiniLM-L6-v2; --task lm: a causal LM, a .gguf file, smollm2 (the default) or gemma3-270m: packaged GGUF files)")
    g.add_argument("--task", help="rotten_tomatoes (default), a GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte wnli), csv, jsonl, "
                   "squad / squad_v2 (extractive QA), or lm (a causal LM, one-shot, perplexity)")
    g.add_argument("--data-dir", help="folder in GLUE layout (<dir>/SST-2/train.tsv ...) or holding SQuAD's "
                   "train-v1.1.json / dev-v1.1.json (-v2.0); default $FACTORLM_DATA_DIR, else the hub")
    g.add_argument("--train-file", help="csv/jsonl task: training file; squad / squad_v2: a SQuAD-format JSON")
    g.add_argument("--dev-file", help="csv/jsonl task: evaluation file; squad / squad_v2: a SQuAD-format JSON")
    g.add_argument("--text-columns", nargs="+", help="csv/jsonl task: one or two text columns")
    g.add_argument("--label-column", help="csv/jsonl task: label column")
    g.add_argument("--max-length", type=int, help="max tokens per example (default 128; squad / squad_v2: 384 per window)")
    g.add_argument("--max-train-samples", type=int, help="random subset of the training set (quick runs)")
    g.add_argument("--max-eval-samples", type=int, help="random subset of each evaluation split (and of the selection slice)")
    g.add_argument("--batch-size", type=int, help="training batch size (default 32)")
    g.add_argument("--eval-batch-size", type=int, help="evaluation batch size (default 128)")
    g.add_argument("--seed", type=int, help="seed for data order, init and sampling (default 0)")
    if train:
        g.add_argument("--selection-size", type=float, help="held-out slice of the training split that keep-best "
                       "selects on (never the reported dev set): a fraction < 1 or a count (default 0.1, at most "
                       "2,000 examples; 0 = no selection, keep the last weights)")
    q = p.add_argument_group("extractive QA (squad, squad_v2)")
    q.add_argument("--split-by-article", type=float, help="one SQuAD file (--dev-file or --train-file) split into train and dev: this "
                   "fraction of its articles is the dev split (e.g. 0.2); the same articles for every --seed")
    q.add_argument("--doc-stride", type=int, help="tokens shared by consecutive windows of a long context (default 128)")
    q.add_argument("--max-answer-length", type=int, help="longest answer, in tokens (default 30)")
    q.add_argument("--n-best", type=int, help="start / end candidates paired per window (default 20)")
    g.add_argument("--recipe", help="YAML/JSON file of options (flags override it); a saved factorlm.json works too")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    lt = p.add_argument_group("measured latency (dense source vs compressed, in the report)")
    lt.add_argument("--latency-batch", type=int, help="batch size of the latency measurement (default 32)")
    lt.add_argument("--latency-seq", type=int, help="sequence length of the latency measurement (default --max-length)")
    lt.add_argument("--no-latency", dest="latency", action="store_const", const=False, help="skip the measurement")
    lt.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                    help="the final model's dtype: final evaluation, latency and saved weights (a bf16 save is half "
                         "the size); default auto: fp32 for encoders, and for --task lm the checkpoint's dtype, in "
                         "which the model is also loaded and calibrated; evaluate: cast the loaded model (default: as saved)")
    if not train:
        return
    t = p.add_argument_group("training (every phase)")
    t.add_argument("--learning-rate", "--lr", type=float, help="AdamW learning rate (default 5e-5)")
    t.add_argument("--epochs", type=float, help="epochs per training phase (default 3)")
    t.add_argument("--max-steps", type=int, help="cap on optimizer steps of every training phase (smoke runs)")
    t.add_argument("--warmup-ratio", type=float, help="linear warm-up fraction (default 0.06)")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--eval-every", type=int, help="score the held-out selection slice every N steps (default: each epoch)")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16", "auto"],
                   help="training precision (default no = fp32); auto = bf16 where the device runs it natively")
    t.add_argument("--group-by-length", action="store_true", default=None,
                   help="draw training batches of similar lengths so dynamic padding pads less (faster; another batch order)")
    t.add_argument("--checkpoint-dir", help="write training checkpoints (accelerate state) here")
    t.add_argument("--save-every", type=int, help="steps between checkpoints (needs --checkpoint-dir)")
    t.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", help="output folder (default runs/<task>-<method>-k<keep>)")
    o.add_argument("--overwrite", action="store_const", const=True, help="replace an existing output folder")


def _lm_eval_flags(g) -> None:
    g.add_argument("--eval-text", help="perplexity text: a corpus (convention, hamlet, debates) or a .txt/.jsonl/.json "
                   "file, disjoint from the calibration (default hamlet)")
    g.add_argument("--seq-len", type=int, help="tokens per calibration window (default 256)")
    g.add_argument("--eval-seq-len", type=int, help="tokens per perplexity window (default: 2048 or the model's "
                   "context if shorter)")
    g.add_argument("--eval-stride", type=int, help="perplexity window stride (default --eval-seq-len: non-overlapping)")
    g.add_argument("--generation-prompts", type=int, help="greedy continuations (48 tokens) of this many fixed prompts, "
                   "dense and compressed, scored for loops (default 4; 0 = none)")
    g.add_argument("--bos", choices=["auto", "yes", "no"], help="a BOS token before every calibration and perplexity "
                   "window: auto (default) where the tokenizer puts one before every text (Llama-style)")
    g.add_argument("--eval-max-tokens", type=int, help="score only the first N tokens of the evaluation text")


def _add_option_flag(g, f: dataclasses.Field, methods: Sequence[str] = ()) -> None:
    """One flag for an Options field: help and choices from ``field(metadata={"help", "choices"})``."""
    flag = "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else None
    tag = f"[{', '.join(methods)}] " if methods else ""
    text = f.metadata.get("help", "")
    helptext = (f"{tag}{text}" + ("" if "default" in text else f" (default {default})")).replace("%", "%%")
    choices = f.metadata.get("choices")
    if isinstance(default, bool) or f.metadata.get("type") is bool:
        g.add_argument(flag, dest=f"mopt_{f.name}", type=_bool, metavar="{true,false}", help=helptext)
        return
    typ = f.metadata.get("type") or (type(default) if default is not None and not isinstance(default, (list, dict)) else str)
    g.add_argument(flag, dest=f"mopt_{f.name}", type=typ, choices=choices, help=helptext,
                   metavar=None if choices else f.name.upper())


def _method_flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """One flag per field of every registered method's Options; returns {dest: method names}."""
    from .methods import METHODS
    from .lm.methods import LM_METHODS

    seen: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    for registry, tag in ((METHODS, ""), (LM_METHODS, " (lm)")):
        for name in registry.names():
            for f in dataclasses.fields(registry.get(name).Options):
                seen.setdefault(f.name, []).append(name + tag)
                fields.setdefault(f.name, f)
    g = p.add_argument_group("method options (apply to the methods named in brackets)")
    for dest, f in sorted(fields.items()):
        _add_option_flag(g, f, seen[dest])
    return {d: ",".join(m) for d, m in seen.items()}


def _prune_options():
    from .methods.prune import PruneOptions

    return PruneOptions


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="factorlm", description="Compress transformer encoders by pruning + low-rank factorization, and decoder LLMs "
        "one-shot by calibrated low-rank factorization (--task lm).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"factorlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compress", help="factorize (+ prune / re-train) a model for a task")
    _common(p)
    c = p.add_argument_group("compression")
    c.add_argument("--method", help="lpaf (default) | svd | fwsvd | prune | rankdyna; with --task lm: rtn-lowrank (default: "
                   "quantization + a low-rank correction in one byte budget) | gptq-lowrank (EoRA) | rtn | gptq | whiten | asvd | svd "
                   "(see `factorlm methods`)")
    c.add_argument("--keep", type=float, help="fraction of the target layers' parameters kept, in (0, 1] (default 0.25)")
    c.add_argument("--rank", type=int, help="explicit uniform rank instead of --keep")
    c.add_argument("--ranks", metavar="FILE", help="per-matrix ranks instead of --keep: JSON {module: rank}, or a "
                   "saved model's factorlm.json / run JSON with a 'ranks' field (e.g. a rankdyna run's allocation); ranks past "
                   "break-even keep the matrix dense (svd, fwsvd, lpaf)")
    c.add_argument("--structure", help="lowrank (default) | monarch | blockwise")
    c.add_argument("--nblocks", type=int, help="Monarch / block-wise: number of blocks")
    c.add_argument("--include", nargs="+", help="regex: only layers whose name matches")
    c.add_argument("--exclude", nargs="+", help="regex: skip layers whose name matches (head/pooler always skipped)")
    c.add_argument("--rank-policy", choices=["uniform", "global"], help="one rank for all matrices, or global allocation")
    c.add_argument("--rank-price", choices=["triplet", "weight"], help="a global rank plan keeps the singular triplets "
                   "with the best score (triplet: the default of --task lm) or the best score per stored weight (weight: "
                   "kfac-global's default; a triplet of a 576x1536 matrix costs 2112 weights, of a 576x192 one 768)")
    c.add_argument("--schedule", choices=["oneshot", "staged"], help="factorize all layers at once or stage by stage")
    c.add_argument("--stages", type=int, help="staged: number of stages (groups of consecutive layers; default one per layer)")
    c.add_argument("--stage-order", choices=["bottom_up", "top_down"], help="staged: which end first (default bottom_up)")
    c.add_argument("--stage-epochs", type=float, help="staged: training epochs after each stage (default epochs / stages)")
    c.add_argument("--teacher", help="dense model already fine-tuned on the task (skips the teacher fine-tune)")
    c.add_argument("--teacher-epochs", type=float, help="epochs of the dense teacher fine-tune (default --epochs)")
    c.add_argument("--teacher-learning-rate", type=float)
    c.add_argument("--cache-dir", help="where dense teachers are cached (default $FACTORLM_CACHE or ~/.cache/factorlm)")
    c.add_argument("--skip-slow", action="store_const", const=True,
                   help="keep dense the target matrices that the speed check finds no faster factorized (at the "
                        "latency batch and --dtype), within the same --keep budget")
    lm = p.add_argument_group("--task lm: one-shot compression of a causal LM (methods rtn-lowrank | gptq-lowrank | rtn | gptq | whiten | asvd | svd)")
    lm.add_argument("--calibration", help="calibration text: a corpus (convention, hamlet, debates) or a .txt/.jsonl/.json "
                    "file (default convention)")
    lm.add_argument("--calibration-samples", type=int, help="random calibration windows of --seq-len tokens (default 128)")
    _lm_eval_flags(lm)
    lm.add_argument("--global-score", choices=["fisher", "energy"], help="--rank-policy global: fisher = each "
                    "matrix's scaled spectrum weighted by the loss gradient on its outputs (default); energy = each "
                    "matrix's relative error")
    lm.add_argument("--rank-multiple", type=int, help="round every rank down to a multiple of this (8: fast kernels)")
    lm.add_argument("--refine-steps", type=int, help="per-block refinement (AA-SVD): after each decoder block is "
                    "compressed, this many AdamW steps fit its factors so that its outputs on the compressed model's "
                    "inputs match the dense block's outputs (default: 32 for rtn-lowrank, factorlm's recipe; 0 = off, the published methods' default; a block that gets worse is restored)")
    lm.add_argument("--refine-lr", type=float, help="learning rate of --refine-steps (default 3e-3: measured best of 1e-4 / 1e-3 / 3e-3 at 32 steps on SmolLM2; AA-SVD uses 1e-4 over ~25 passes)")
    lm.add_argument("--refine-params", choices=["factors", "all"], help="what --refine-steps trains: the targets' "
                    "factors (default) or every floating parameter of the block (norms and biases too)")
    lm.add_argument("--refine-loss", choices=["mse", "fisher"], help="what --refine-steps minimises: mse = the "
                    "block-output error relative to the dense block's (AA-SVD's, default); fisher = that error "
                    "weighted by the output-gradient Gram of the block's output on the dense model (factorlm's: the "
                    "loss-aware version, as --method kfac is of whiten; one more backward per calibration window)")
    lm.add_argument("--heal-steps", type=int, help="optimizer steps of language-model fine-tuning of the factors on "
                    "the calibration windows after the one-shot factorization (default 0)")
    lm.add_argument("--heal-params", choices=["factors", "all"], help="what healing trains (default factors)")
    lm.add_argument("--heal-loss", choices=["lm", "distill"], help="healing objective: distill = KL to the dense "
                    "model's next-token distribution (default: measured better, BENCHMARKS.md); lm = next-token loss on "
                    "the calibration text")
    lm.add_argument("--heal-samples", type=int, help="calibration-text windows healing draws from (default 1024, "
                    "or as many as the text holds)")
    lm.add_argument("--heal-optimizer", choices=["auto", "adamw", "adamw-sr", "adamw8bit"], help="auto (default): "
                    "torchao's AdamW with stochastic rounding for bf16 weights (torch's AdamW rounds small updates of "
                    "bf16 weights away), torch's AdamW otherwise; adamw8bit: torchao's 8-bit moments (2 bytes per "
                    "trainable parameter instead of 8)")
    lm.add_argument("--heal-update", choices=["joint", "sequential"], help="joint: both factors of every layer train "
                    "together (default); sequential: SVD-LLM's update, A for half the steps, then B (gradients and "
                    "optimizer state for one factor at a time)")
    lm.add_argument("--heal-checkpointing", action="store_true", default=None, help="gradient checkpointing during "
                    "healing (transformers'): activations of one block at a time, one more forward per step")
    lm.add_argument("--heal-curve", nargs="+", type=int, metavar="STEP", help="also measure the held-out perplexity "
                    "at these optimizer steps of the healing run (e.g. 50 100 200: what each minute buys; the points "
                    "share the full run's learning-rate schedule)")
    lm.add_argument("--device", help="execution device: auto (a GPU when one is visible, default), cpu, cuda, cuda:N")
    lm.add_argument("--offload", choices=["none", "cpu"], help="cpu: keep the model on the CPU; its decoder blocks "
                    "visit the device one at a time for calibration and factorization, and evaluation / healing "
                    "spread it over every visible GPU with accelerate (for models larger than the GPU); default none")
    _method_flags(p)

    p = sub.add_parser("prune", help="unstructured pruning alone (PLATON, movement or magnitude): a sparse model + masks")
    _common(p)
    g = p.add_argument_group("pruning")
    g.add_argument("--keep", type=float, help="budget the density defaults to (default density = keep)")
    g.add_argument("--include", nargs="+", help="regex: only layers whose name matches")
    g.add_argument("--exclude", nargs="+", help="regex: skip layers whose name matches")
    g.add_argument("--teacher", help="dense model already fine-tuned on the task")
    g.add_argument("--teacher-epochs", type=float)
    g.add_argument("--cache-dir")
    for f in dataclasses.fields(_prune_options()):
        _add_option_flag(g, f)

    p = sub.add_parser("finetune", help="dense fine-tuning of a pre-trained model (the teacher)")
    _common(p)

    p = sub.add_parser("analyze", help="low-rank analysis: spectrum + error vs rank of T, UP_zero(T), UP_first(T) (PNG)")
    p.add_argument("dense", help="fine-tuned dense model folder (T)")
    p.add_argument("--pruned", help="first-order pruned model folder (from `factorlm prune`)")
    p.add_argument("--module", help="target layer name or regex (default: the first target layer)")
    p.add_argument("--density", type=float, help="density for UP_zero (default: the pruned model's)")
    p.add_argument("--output", "-o", default="lowrank.png", help="PNG path (default lowrank.png)")
    p.add_argument("--rank", type=int, help="instead of the figure: every target matrix's error at this rank (JSON)")
    p.add_argument("--keep", type=float, help="instead of the figure: every matrix's error at its budget rank (JSON)")

    p = sub.add_parser("evaluate", help="score a saved model on its task, with the data settings it recorded")
    p.add_argument("path", help="model folder")
    p.add_argument("--split", default="dev", help="dev (default: the task's evaluation splits) or test (where the task has one)")
    _common(p, train=False)
    _lm_eval_flags(p.add_argument_group("--task lm (a causal LM folder: perplexity; default: the settings it recorded)"))

    p = sub.add_parser("info", help="what a saved folder holds: params, per-module ranks, method, recipe")
    p.add_argument("path", help="model folder")
    p.add_argument("--json", action="store_true", help="print factorlm.json as JSON")

    from . import export

    export.add_parser(sub)

    sub.add_parser("methods", help="list compression methods")
    sub.add_parser("tasks", help="list tasks")
    return parser


def _config_from_args(args: argparse.Namespace, **forced: Any):
    from .config import RunConfig, load_recipe

    values: dict[str, Any] = {}
    if getattr(args, "recipe", None):
        values.update(load_recipe(args.recipe))
    fields = RunConfig.field_names()
    for k, v in vars(args).items():
        if v is not None and k in fields:
            values[k] = v
    mopts = dict(values.get("method_options") or {})
    for k, v in vars(args).items():
        if k.startswith("mopt_") and v is not None:
            mopts[k[5:]] = v
    values["method_options"] = mopts
    values.update(forced)
    if values.get("task") == "lm" and "method" not in values:
        values["method"] = "rtn-lowrank"  # --task lm: the best measured recipe at equal bytes (BENCHMARKS.md)
    return RunConfig(**values)


def _given_fields(args: argparse.Namespace) -> set[str]:
    """The RunConfig fields the user set (by flag or --recipe)."""
    from .config import RunConfig, load_recipe

    names = {k for k, v in vars(args).items() if v is not None and k in RunConfig.field_names()}
    if getattr(args, "recipe", None):
        names |= set(load_recipe(args.recipe)) & RunConfig.field_names()
    return names - {"method_options"}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.command == "methods":
            from .methods import METHODS

            from .lm.methods import LM_METHODS

            for name in METHODS.names():
                cls = METHODS.get(name)
                start = "fine-tuned teacher" if cls.needs_teacher else "pre-trained model"
                print(f"{name:<10} {cls.summary}  [starts from a {start}]")
            print("\n--task lm (causal language models, one-shot):")
            for name in LM_METHODS.names():
                print(f"{name:<10} {LM_METHODS.get(name).summary}")
        elif args.command == "tasks":
            from .data import TASKS, get_task

            for name in TASKS.names():
                try:
                    t = get_task(name)
                    if t.is_qa:
                        print(f"{name:<16} {t.description}, metrics exact and f1 (main f1)")
                        continue
                    print(f"{name:<16} {t.num_labels} label(s), metric {t.main_metric}")
                except FactorLMError:
                    print(f"{name:<16} your own files (--train-file/--dev-file/--text-columns/--label-column)")
            print(f"{'lm':<16} causal language modelling (decoder LLMs), metric perplexity on --eval-text")
        elif args.command == "info":
            _cmd_info(args)
        elif args.command == "export":
            from . import export

            export.run(args)
        elif args.command == "analyze":
            from .analysis import analyze_models, rank_errors

            if args.rank is not None or args.keep is not None:
                if not args.pruned:
                    raise FactorLMError("--rank/--keep compare with a pruned model: give --pruned DIR")
                summary = rank_errors(args.dense, args.pruned, rank=args.rank, keep=args.keep)
                print(json.dumps(summary["mean"], indent=1))
                return 0
            summary = analyze_models(args.dense, args.pruned, args.module, args.density, args.output)
            print(json.dumps({k: v for k, v in summary.items() if k != "title"}, indent=1, default=str))
        elif args.command == "prune":
            from . import api

            config = _config_from_args(args, method="prune")
            _print_report(api.compress(config, quiet=args.quiet))
        elif args.command == "evaluate":
            from .api import evaluate_config, evaluate_model

            flags = _config_from_args(args, model=args.path)
            given = {k: getattr(flags, k) for k in _given_fields(args)}
            config = evaluate_config(args.path, given)
            if config.task == "lm":
                from .lm import evaluate_lm

                print(json.dumps(evaluate_lm(args.path, config, quiet=args.quiet, dtype=args.dtype), indent=2))
                return 0
            report: dict = {}
            metrics = evaluate_model(args.path, config, quiet=args.quiet, split=args.split, dtype=args.dtype,
                                     details=report)
            print(json.dumps({**metrics, **({"latency": report["latency"]} if report.get("latency") else {})},
                             indent=2))
        else:
            from . import api

            config = _config_from_args(args)
            report = (api.compress if args.command == "compress" else api.finetune)(config, quiet=args.quiet)
            _print_report(report)
    except FactorLMError as e:
        print(f"factorlm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a read-only file system ...: one line, no traceback
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        text = e.strerror or " ".join(str(e).split()) or type(e).__name__
        print(f"factorlm: error: {text}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("factorlm: interrupted (nothing was written)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
