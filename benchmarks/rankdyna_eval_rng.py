"""Diagnostic (issue 11, session 15): RankDyna on STS-B, keep 0.25, seed 2 collapsed in the protocol's
run (Pearson 0 from its first evaluation, step 162).  Re-run the identical configuration with a
selection evaluation every 27 steps to see where it fails.

Each evaluation's DataLoader drew its base seed from the *global* torch RNG, so evaluating more often
shifted the dropout stream that training sees afterwards: this run was the same seed and configuration
on a different dropout stream, not a replay.  Since session 17 evaluation forks the RNG, so at a later
commit this script and a re-run of the protocol's cell train identically; both differ from the committed
protocol run after its first evaluation (step 162), and the committed log came from the code before.
Output: ``results/rankdyna_eval_rng.json``; the committed ``results/rankdyna_eval_rng.log`` is its
evaluation lines (stdout):

    python benchmarks/rankdyna_eval_rng.py > benchmarks/results/rankdyna_eval_rng.log
"""
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import protocol as P  # noqa: E402

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    P.COMMON = {**P.COMMON, "eval_every": 27}
    args = types.SimpleNamespace(quick=False, max_steps=None, mixed_precision=None, verbose=True, threads=1)
    r = P.run_one("stsb", "RankDyna", 0.25, 2, args)
    out = P.RESULTS / "rankdyna_eval_rng.json"
    out.write_text(json.dumps(r, indent=1, default=str))  # as protocol.py writes its runs
    print("score", r["score"], "stored", r["accounting"]["target_ratio"], "->", out)
