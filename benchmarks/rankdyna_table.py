"""Issue 11: RankDyna's protocol runs beside the distilled grid, and the ``*_rd_ranks`` diagnostic
(SVD_Ft with the per-matrix ranks RankDyna learned for the same task, keep and seed).

Reads ``results/runs_protocol/*.json`` (written by ``protocol.py``); runs nothing.  Writes
``results/rankdyna_protocol.md`` and prints it.  Scores x100, per seed (0 / 1 / 2) and mean +- sample
std; † = collapsed (constant predictions on dev, the run's health flag); "stored" is each run's share
of the dense target weights.

    python benchmarks/rankdyna_table.py
"""

from __future__ import annotations

import json
import statistics as st
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = [("mrpc", "F1"), ("stsb", "Pearson"), ("rotten_tomatoes", "acc"), ("sst2", "acc")]
KEEPS = (0.25, 0.16)
SEEDS = (0, 1, 2)
KD = ("SVD_Ft_KD", "FWSVD_Ft_KD", "LPAF_KD")
# the diagnostic's columns: uniform ranks against RankDyna's learned ranks, without and with KD
DIAG = ("SVD_Ft", "SVD_Ft_global", "FWSVD_Ft_global", "SVD_Ft_rd_ranks", "SVD_Ft_rdw_ranks", "SVD_Ft_KD",
        "SVD_Ft_KD_rd_ranks", "RankDyna", "RankDyna_weights")


def load_runs() -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((RESULTS / "runs_protocol").glob("*.json"))
            if not f.name.startswith(("quick__", "ms"))]


def cell(runs, task, name, keep) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if r["task"] == task and r["name"] == name and r["keep"] == keep
            and not r.get("quick") and not r.get("max_steps")}


def ms(xs) -> str:
    xs = list(xs)
    if not xs:
        return ""
    return f"{st.mean(xs):.1f} ± {st.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f} (1 seed)"


def per_seed(rs: dict[int, dict], key=lambda r: 100 * r["score"], fmt="{:.1f}", mark=True) -> str:
    def one(s):
        if s not in rs:
            return "–"
        return fmt.format(key(rs[s])) + ("†" if mark and rs[s]["health"].get("collapsed") else "")
    return " / ".join(one(s) for s in SEEDS)


def stored(rs) -> str:
    return per_seed(rs, key=lambda r: 100 * r["accounting"]["target_ratio"], mark=False)


def acc(rs) -> str:
    return ms(100 * r["phases"]["final"]["accuracy"] for r in rs.values())


def main_table(runs) -> list[str]:
    out = ["| task (metric) | keep | RankDyna per seed (0 / 1 / 2) | RankDyna mean ± std | stored % (per seed) | "
           + " | ".join(KD) + " | teacher (KD grid) |", "|---" * (5 + len(KD) + 1) + "|"]
    for task, metric in TASKS:
        for k in KEEPS:
            rd = cell(runs, task, "RankDyna", k)
            kd = [cell(runs, task, n, k) for n in KD]
            mean = ms(100 * r["score"] for r in rd.values())
            cols = [ms(100 * r["score"] for r in c.values()) for c in kd]
            if task == "mrpc":  # F1 of MRPC sits near the majority class's: accuracy beside it
                mean += f" (acc {acc(rd)})" if rd else ""
                cols = [f"{x} (acc {acc(c)})" if c else x for x, c in zip(cols, kd)]
            teacher = ms(100 * r["dense_score"] for r in kd[0].values())
            out.append(f"| {task} ({metric}) | {k:g} | {per_seed(rd)} | {mean} | {stored(rd)} | {' | '.join(cols)} | {teacher} |")
    return out


def diag_table(runs) -> list[str]:
    rows = []
    for task, metric in TASKS:
        for k in KEEPS:
            if not any(cell(runs, task, n, k) for n in DIAG if "_ranks" in n):
                continue
            for n in DIAG:
                rs = cell(runs, task, n, k)
                if rs:
                    rows.append(f"| {task} ({metric}) | {k:g} | {n} | {per_seed(rs)} | {ms(100 * r['score'] for r in rs.values())} "
                                f"| {stored(rs)} | {per_seed(rs, key=lambda r: r['wall_s'], fmt='{:.0f}', mark=False)} |")
    if not rows:
        return []
    return ["| task (metric) | keep | run | per seed (0 / 1 / 2) | mean ± std | stored % (per seed) | wall s (per seed) |",
            "|---|---|---|---|---|---|---|", *rows]


def main() -> None:
    runs = load_runs()
    md = ["### RankDyna (no teacher, no distillation) beside the distilled grid", "", *main_table(runs)]
    diag = diag_table(runs)
    if diag:
        md += ["", "### SVD_Ft with RankDyna's learned ranks (`*_rd_ranks`: `--ranks` = RankDyna's run of the same "
               "task, keep and seed)", "", *diag]
    text = "\n".join(md) + "\n\n† = collapsed (constant predictions on dev).\n"
    (RESULTS / "rankdyna_protocol.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
