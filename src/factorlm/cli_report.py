"""What the ``factorlm`` command prints: a run's report and ``factorlm info``."""

from __future__ import annotations

import json


def print_lm_report(report) -> None:
    from .summary import lm_lines

    print(f"\n{report.method} on a causal LM (perplexity on held-out text, lower is better)")
    for line in lm_lines({"scores": report.scores, "accounting": report.accounting, "flops_per_token": report.flops,
                          "latency": report.latency, "method_info": report.info}):
        print("  " + line)
    for w in report.warnings:
        print(f"  WARNING: {w}")
    if report.output:
        print(f"saved to {report.output}")


def print_report(report) -> None:
    from .summary import score_rows

    if report.task == "lm":
        print_lm_report(report)
        return

    print(f"\n{report.method} on {report.task} (dev scores)")
    for line in score_rows(report.scores, report.baseline, report.task):
        print("  " + line)
    for w in report.warnings:
        print(f"  WARNING: {w}")
    acc = report.accounting
    if acc.get("target_weights_before"):
        print(f"  target weights {acc['target_weights_before']:,} -> {acc['target_weights_after']:,} "
              f"({acc['target_weights_after'] / acc['target_weights_before']:.2%})")
    if acc.get("model_params_before"):
        print(f"  model params   {acc['model_params_before']:,} -> {acc['model_params_after']:,} "
              f"({acc['model_params_after'] / acc['model_params_before']:.2%})")
    if report.flops.get("dense"):
        print(f"  FLOPs/sequence {report.flops['dense']:,} -> {report.flops['final']:,} "
              f"({report.flops['dense'] / report.flops['final']:.2f}x fewer)")
    print(f"  training steps {report.total_train_steps}")
    if report.latency:
        from .summary import latency_lines

        for line in latency_lines(report.latency):
            print("  " + line)
    if report.output:
        print(f"saved to {report.output}")


def cmd_info(args) -> None:
    from .api import info
    from .summary import format_info

    meta = info(args.path)
    if args.json:
        print(json.dumps(meta, indent=2))
        return
    print(format_info(meta, args.path))
