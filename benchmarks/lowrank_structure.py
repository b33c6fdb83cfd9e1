"""Is the pruned model low-rank? (LPAF's premise, over every target matrix, not one.)

For each pruned model cached by the LPAF benchmark (benchmarks/results/cache/pruned/<task>-k<keep>[-e3])
and its dense teacher: the mean relative error ||W - W_k||_F / ||W||_F of the best rank-k fit, k =
each matrix's uniform budget rank at that keep, for T, T magnitude-pruned to the same density (UP_zero)
and the first-order pruned matrix (UP_first); plus the share of rows/columns pruned away entirely.

    python benchmarks/lowrank_structure.py
"""

import json
import re
from pathlib import Path

import torch

from factorlm.analysis import rank_errors

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    torch.set_num_threads(1)
    cache = RESULTS / "cache"
    rows = []
    for pruned in sorted((cache / "pruned").glob("*-k*")):
        m = re.fullmatch(r"(.+)-k([0-9.]+)(-.+)?", pruned.name)  # <task>-k<keep>[-<variant>]
        teachers = sorted((cache / "teachers").glob(f"{m[1]}-*")) if m else []
        if not teachers:
            continue
        res = rank_errors(str(teachers[0]), str(pruned), keep=float(m[2]))
        rows.append({"task": m[1], "keep": float(m[2]), "pruning": f"{(m[3] or '-e1')[2:]} epoch(s)", **res["mean"]})
        print(rows[-1], flush=True)
    if not rows:
        raise SystemExit("no cached pruned models: run benchmarks/lpaf.py first")
    cols = [c for c in rows[0] if c not in ("task", "keep", "pruning")]
    md = ["| task | keep | pruning | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    md += [f"| {r['task']} | {r['keep']:g} | {r['pruning']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |"
           for r in rows]
    print("\n".join(md))
    (RESULTS / "lowrank_structure.md").write_text("\n".join(md) + "\n")
    (RESULTS / "lowrank_structure.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
