"""LPAF benchmark (issue 3): dense teacher, SVD_Ft, FWSVD_Ft and LPAF at keep 0.5/0.25/0.16, ablations at 0.25.

Same machinery, settings and resumable run cache as ``quality.py`` (``--preset lpaf``); the dense teacher
and each (task, keep) pruned model are cached under benchmarks/results/cache/, so the ablations re-use the
LPAF run's pruning. Any quality.py flag works (``--tasks``, ``--keeps``, ``--threads``, ``--table-only``).

    python benchmarks/lpaf.py --tasks rotten_tomatoes sst2 mrpc
"""

import sys

from quality import main

if __name__ == "__main__":
    sys.argv[1:1] = ["--preset", "lpaf", "--name", "lpaf"]  # later flags override these
    main()
