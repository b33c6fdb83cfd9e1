"""RankDyna (Hua et al., Findings of EMNLP 2023, "Dynamic Low-rank Estimation for Transformer-based
Language Models"): decide every matrix's rank *during* task fine-tuning, in one round.

Recipe::

    to_svd_linear(model, targets)              # W -> U diag(s) V (full-rank SVD of the pre-trained W)
    cb = RankDynaCallback(keep=0.25)           # + Trainer(..., callbacks=[cb]).fit()
    ranks = cb.final_ranks                     # truncated to LowRankLinear at on_train_end

During fine-tuning ``U, s, V`` are all trained.  Every step the callback folds ``|theta * grad|``
of every ``U, s, V`` entry into AdaLoRA's smoothed sensitivity x uncertainty score
(:class:`~factorlm.ranks.allocator.SensitivityTracker`); every ``delta_t`` steps the budget of
:func:`~factorlm.ranks.schedule.budget_at` (cubic, from the full SVD's size down to ``keep`` x the
dense target weights) is spent on the globally best triplets
(:func:`~factorlm.ranks.allocator.global_allocation`: one threshold across all matrices, so ranks
become non-uniform) and written into each layer's ``rank_mask``.  In the final phase the masks
are frozen and the kept triplets are fine-tuned; at the end each layer is physically truncated.

Defaults and why:

* ``warmup=0.1``: the EMA horizon is ~``1/(1-0.85)`` ~ 7 steps, but the task head is random at the
  start, so early gradients (and sensitivities) mostly reflect the head; 10 % of the run lets the
  model adapt to the task before the first triplet is removed (AdaLoRA uses 5-15 %).
* ``final=0.2``: after the last removal the remaining triplets need time to absorb the lost ones
  (the recovery fine-tuning of two-round methods, folded into the same run).
* ``delta_t=10``: masks change often enough to follow the cubic schedule smoothly, rarely enough
  to keep the per-step overhead (one CPU sort of all triplet scores) negligible.
* ``orth_reg=0.1``: AdaLoRA's weight for the orthogonality regulariser, which keeps ``U``/``V``
  near-orthonormal so that ``s`` stays a meaningful per-direction scale.  The callback adds
  ``orth_reg * mean over layers of ||U^T U - I||_F^2 + ||V V^T - I||_F^2`` (a mean, like AdaLoRA,
  so the weight does not depend on the number of layers).
* ``beta1 = beta2 = 0.85``: AdaLoRA's GLUE setting.

Masked triplets are masked, not zeroed (see :mod:`factorlm.layers.svd_masked`): a triplet may
come back while the budget still allows it; its gradients are 0 while masked, so its score decays.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import check
from ..layers.svd_masked import SVDLinear
from ..train.callbacks import Callback
from .allocator import SensitivityTracker, global_allocation, kept_cost
from .budget import check_keep, past_break_even
from .schedule import budget_at, phase_steps

logger = logging.getLogger("factorlm.rankdyna")

__all__ = ["RankDynaCallback", "to_svd_linear", "svd_modules", "plot_ranks", "plot_budget"]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_svd_linear(
    model: nn.Module,
    target_names: Iterable[str],
    init_rank: int | Mapping[str, int] | None = None,
) -> nn.Module:
    """Replace each named ``nn.Linear`` by :meth:`SVDLinear.from_linear` in place; returns ``model``.

    ``init_rank``: None = full rank ``min(out, in)`` (the forward is unchanged); an int (clamped to
    ``min(out, in)``) or ``{name: rank}`` starts from a truncated SVD instead (less memory, but the
    initial model is already an approximation).  Names already holding an SVDLinear are left as is.
    """
    for name in target_names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            check(False, f"no module named {name!r} in the model")
        if isinstance(lin, SVDLinear):
            continue
        check(isinstance(lin, nn.Linear), f"{name} is not an nn.Linear (already factorized?)")
        r = init_rank.get(name) if isinstance(init_rank, Mapping) else init_rank
        if r is not None:
            r = min(int(r), lin.in_features, lin.out_features)
        _set_module(model, name, SVDLinear.from_linear(lin, rank=r))
    return model


def svd_modules(model: nn.Module) -> dict[str, SVDLinear]:
    """``{dotted name: SVDLinear}`` in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def _unwrap(trainer) -> nn.Module:
    model = getattr(trainer, "unwrapped_model", None)
    if model is not None:
        return model
    acc = getattr(trainer, "accelerator", None)
    if acc is not None and hasattr(acc, "unwrap_model"):
        return acc.unwrap_model(trainer.model)
    return trainer.model


class RankDynaCallback(Callback):
    """Dynamic global rank allocation over a model's :class:`SVDLinear` layers (see module docs).

    ``keep``: fraction of the target layers' dense weights kept at the end (``sum in*out`` over the
    SVDLinear layers; biases excluded): the final ``sum k_m (in_m + out_m) <= floor(keep * sum
    in_m out_m)``.  ``total_steps`` defaults to ``trainer.state.total_steps``; ``warmup`` / ``final``
    are fractions of it (floats < 1) or step counts (ints).

    Step ``t`` = finished optimizer steps (``trainer.state.step``, already incremented when
    ``on_step_end`` runs).  Hooks: ``compute_loss`` adds the orthogonality regulariser,
    ``on_after_backward`` updates the sensitivities (until the masks are frozen), ``on_step_end``
    reallocates every ``delta_t`` steps after the warm-up and freezes the final allocation (at the
    target budget) at ``t = total - final_steps``; ``on_train_end`` truncates every SVDLinear to a
    LowRankLinear (``finalize_on_train_end``) and stores :attr:`final_ranks`.  With ``densify`` (default),
    a matrix whose kept rank is past the break-even ``k (in + out) >= in * out`` becomes a plain
    ``nn.Linear`` instead (same function, fewer weights); :attr:`dense_modules` lists them.

    ``reset_best_at_freeze``: at the freeze, reset ``trainer.state.best_metric`` so that the
    Trainer's keep-best snapshot can only come from the final phase, whose masks fit the budget.
    :meth:`finalize` re-imposes the final masks in any case if the model exceeds the budget.

    Recorded for plots / reports: :attr:`history` (``{"step", "budget", "kept_params"}`` at each
    allocation, plus step 0) and :attr:`rank_history` (``{"step", "ranks"}`` with ``ranks`` a list
    aligned with :attr:`names`).
    """

    def __init__(
        self,
        keep: float,
        *,
        total_steps: int | None = None,
        warmup: float | int = 0.1,
        final: float | int = 0.2,
        delta_t: int = 10,
        orth_reg: float = 0.1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        min_one: bool = True,
        finalize_on_train_end: bool = True,
        reset_best_at_freeze: bool = True,
        balanced: bool = True,
        densify: bool = True,
    ):
        self.keep = check_keep(keep)
        check(total_steps is None or total_steps >= 1, f"total steps must be >= 1, got {total_steps}")
        check(int(delta_t) >= 1, f"delta_t must be >= 1, got {delta_t}")
        check(orth_reg >= 0, f"orth_reg must be >= 0, got {orth_reg}")
        self.total_steps_arg = total_steps
        self.warmup, self.final = warmup, final
        self.delta_t = int(delta_t)
        self.orth_reg = float(orth_reg)
        self.min_one = bool(min_one)
        self.finalize_on_train_end = bool(finalize_on_train_end)
        self.reset_best_at_freeze = bool(reset_best_at_freeze)
        self.balanced = bool(balanced)
        self.densify = bool(densify)
        self.tracker = SensitivityTracker(beta1, beta2)

        self.model: nn.Module | None = None
        self.modules: dict[str, SVDLinear] = {}
        self.names: list[str] = []
        self.costs: dict[str, int] = {}
        self.total_steps = self.warmup_steps = self.final_steps = 0
        self.initial_budget = self.target_budget = 0
        self.frozen = False
        self.final_masks: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, int]] = []
        self.rank_history: list[dict[str, Any]] = []
        self.final_ranks: dict[str, int] | None = None
        self.dense_modules: list[str] = []

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, total_steps: int | None = None) -> "RankDynaCallback":
        """Find the SVDLinear layers and fix budgets and phases (``on_train_begin`` calls this)."""
        total = self.total_steps_arg if self.total_steps_arg is not None else total_steps
        check(total is not None and int(total) >= 1, f"RankDyna needs the number of training steps (>= 1), got {total}")
        self.model = model
        self.modules = svd_modules(model)
        check(len(self.modules) > 0, "RankDyna: the model has no SVDLinear layers (call to_svd_linear first)")
        self.names = list(self.modules)
        self.costs = {n: m.triplet_cost() for n, m in self.modules.items()}
        self.total_steps = int(total)
        self.warmup_steps, self.final_steps = phase_steps(self.total_steps, self.warmup, self.final)
        self.initial_budget = sum(m.rank * self.costs[n] for n, m in self.modules.items())
        dense = sum(m.in_features * m.out_features for m in self.modules.values())
        self.target_budget = min(math.floor(self.keep * dense), self.initial_budget)
        if self.min_one:
            need = sum(self.costs.values())
            check(need <= self.target_budget,
                  f"--keep {self.keep} is too small for RankDyna: rank 1 for every matrix needs "
                  f"{need / dense:.4f} of the target parameters")
        if not self.history:
            self._record(0, self.initial_budget)
        logger.info("RankDyna: %d matrices, budget %d -> %d weights over %d steps (warm-up %d, final %d, every %d)",
                    len(self.names), self.initial_budget, self.target_budget, self.total_steps,
                    self.warmup_steps, self.final_steps, self.delta_t)
        return self

    @property
    def final_start(self) -> int:
        """First step of the final phase (masks frozen at the target budget from here on)."""
        return max(self.total_steps - self.final_steps, self.warmup_steps + 1)

    def budget(self, step: int) -> int:
        return budget_at(step, self.total_steps, self.initial_budget, self.target_budget,
                         self.warmup_steps, self.final_steps)

    def kept_params(self) -> int:
        """Weights the current masks keep after truncation: ``sum k_m (in_m + out_m)``."""
        return sum(m.kept_weight_params() for m in self.modules.values())

    def ranks(self) -> dict[str, int]:
        return {n: m.kept_rank() for n, m in self.modules.items()}

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        state = getattr(trainer, "state", None)
        self.setup(_unwrap(trainer), getattr(state, "total_steps", None))

    def compute_loss(self, trainer, batch, outputs, loss: torch.Tensor) -> torch.Tensor:
        if self.orth_reg > 0 and self.modules and torch.is_grad_enabled():
            reg = sum(m.orth_penalty() for m in self.modules.values()) / len(self.modules)
            loss = loss + self.orth_reg * reg.to(loss.dtype)
        return loss

    def on_after_backward(self, trainer) -> None:
        if self.modules and not self.frozen:
            self.tracker.update(self._named_params())

    def on_step_end(self, trainer) -> None:
        self.step_end(int(trainer.state.step), trainer)

    def on_train_end(self, trainer) -> None:
        if self.finalize_on_train_end and self.modules:
            self.finalize(_unwrap(trainer))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able progress (sensitivity statistics are not included: they re-warm in ~10 steps)."""
        return {"frozen": self.frozen, "history": list(self.history), "rank_history": list(self.rank_history),
                "names": list(self.names), "final_ranks": self.final_ranks,
                "final_masks": None if self.final_masks is None else
                {n: m.cpu().tolist() for n, m in self.final_masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.frozen = bool(state.get("frozen", False))
        self.history = list(state.get("history", []))
        self.rank_history = list(state.get("rank_history", []))
        self.final_ranks = state.get("final_ranks")
        fm = state.get("final_masks")
        self.final_masks = None if fm is None else {n: torch.tensor(v, dtype=torch.bool) for n, v in fm.items()}

    # -- the allocation --------------------------------------------------------------------------
    def _named_params(self):
        for n, m in self.modules.items():
            yield f"{n}.U", m.U
            yield f"{n}.s", m.s
            yield f"{n}.V", m.V

    def step_end(self, step: int, trainer=None) -> int | None:
        """Reallocate if ``step`` (finished steps) calls for it; returns the budget used, else None."""
        if not self.modules or self.frozen or step <= self.warmup_steps:
            return None
        if step >= self.final_start:
            budget = self.allocate(step, self.target_budget)
            self.frozen = True
            self.final_masks = {n: m.kept_mask().cpu() for n, m in self.modules.items()}
            logger.info("RankDyna: final allocation at step %d: %d weights kept (target %d)",
                        step, self.kept_params(), self.target_budget)
            state = getattr(trainer, "state", None)
            if self.reset_best_at_freeze and state is not None and hasattr(state, "best_metric"):
                state.best_metric = None
                if hasattr(state, "best_step"):
                    state.best_step = None
            return budget
        if step % self.delta_t == 0:
            return self.allocate(step)
        return None

    def scores(self) -> dict[str, torch.Tensor]:
        """Triplet scores; before any sensitivity update, each matrix's energy ``s_i^2 / sum s^2``."""
        if self.tracker.num_updates > 0:
            return self.tracker.triplet_scores(self.modules)
        out = {}
        for n, m in self.modules.items():
            e = m.effective_s().detach().float().pow(2)
            out[n] = e / e.sum().clamp_min(1e-30)
        return out

    @torch.no_grad()
    def allocate(self, step: int, budget: int | None = None) -> int:
        """Spend ``budget`` (default: the schedule's at ``step``) on the best triplets; write the masks."""
        budget = self.budget(step) if budget is None else int(budget)
        masks = global_allocation(self.scores(), self.costs, budget, self.min_one)
        for n, m in self.modules.items():
            m.set_mask(masks[n])
        self._record(step, budget, kept_cost(masks, self.costs), [int(masks[n].sum()) for n in self.names])
        return budget

    def _record(self, step: int, budget: int, kept: int | None = None, ranks: Sequence[int] | None = None) -> None:
        if ranks is None:
            ranks = [m.kept_rank() for m in self.modules.values()]
        if kept is None:
            kept = self.kept_params()
        self.history.append({"step": int(step), "budget": int(budget), "kept_params": int(kept)})
        self.rank_history.append({"step": int(step), "ranks": list(ranks)})

    # -- the end ---------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self, model: nn.Module | None = None) -> dict[str, int]:
        """Truncate every SVDLinear of ``model`` (default: the set-up one) to a LowRankLinear in place.

        If the masks exceed the target budget (training stopped before the final phase, or
        best-weights restoring brought back earlier masks), the final masks are imposed first
        (or, without a final allocation, one is made now at the target budget) with a warning.
        Returns (and stores in :attr:`final_ranks`) ``{name: rank}``.
        """
        model = model if model is not None else self.model
        check(model is not None, "RankDyna: finalize() needs a model (or setup() first)")
        mods = svd_modules(model)
        if not mods:
            return dict(self.final_ranks or {})
        if self.model is None:  # never set up: budgets from this model, no schedule
            self.setup(model, self.total_steps_arg or 1)
        elif set(mods) != set(self.modules) or any(mods[n] is not self.modules.get(n) for n in mods):
            self.modules = mods  # e.g. a reloaded copy of the model
            self.costs = {n: m.triplet_cost() for n, m in mods.items()}
        if self.kept_params() > self.target_budget:
            if self.final_masks is not None and set(self.final_masks) == set(self.modules):
                warnings.warn("RankDyna: the model's rank masks exceed the target budget (restored from an "
                              "earlier step?); imposing the final allocation", stacklevel=2)
                for n, m in self.modules.items():
                    m.set_mask(self.final_masks[n].to(m.rank_mask.device))
            else:
                warnings.warn("RankDyna: training ended before the final allocation; allocating the target "
                              "budget now from the current scores", stacklevel=2)
                self.allocate(self.total_steps, self.target_budget)
                self.frozen = True
        kept = self.kept_params()
        ranks: dict[str, int] = {}
        self.dense_modules = []
        for n, m in list(self.modules.items()):
            low = new = m.truncate(balanced=self.balanced)
            if self.densify and past_break_even(low.out_features, low.in_features, low.rank):
                new = low.to_linear()  # past the break-even rank the dense matrix is the smaller one
                self.dense_modules.append(n)
            new.train(m.training)
            _set_module(model, n, new)
            ranks[n] = low.rank
        self.final_ranks = ranks
        self.modules = {}
        self.tracker.reset()
        logger.info("RankDyna: truncated %d matrices (%d kept dense), %d weights kept (target %d)", len(ranks),
                    len(self.dense_modules), kept, self.target_budget)
        return ranks

    def summary(self) -> dict[str, Any]:
        """JSON-able record for reports: budgets, phases, histories, final ranks."""
        return {"keep": self.keep, "initial_budget": self.initial_budget, "target_budget": self.target_budget,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "final_steps": self.final_steps,
                "delta_t": self.delta_t, "orth_reg": self.orth_reg, "names": list(self.names),
                "history": list(self.history), "rank_history": list(self.rank_history), "final_ranks": self.final_ranks}


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.(.+)$")


def _layer_grid(ranks: Mapping[str, int]):
    """Rows = layer indices (sorted; unmatched names in a last row "other"), columns = module paths."""
    cells, rows, cols = {}, [], []
    for name, k in ranks.items():
        mt = _LAYER_RE.search(name)
        row, col = (int(mt.group(1)), mt.group(2)) if mt else ("other", name)
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)
        cells[(row, col)] = k
    rows = sorted(r for r in rows if r != "other") + (["other"] if "other" in rows else [])
    return rows, cols, cells


def plot_ranks(ranks: Mapping[str, int], path, title: str | None = None) -> str:
    """Heat map of ranks, layers (rows) x module (columns, e.g. ``attention.self.query``); writes a PNG.

    The layer index is parsed from ``...layer.{i}.<module path>``; other names go to a row "other".
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check(len(ranks) > 0, "no ranks to plot")
    rows, cols, cells = _layer_grid(ranks)
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), k in cells.items():
        grid[rows.index(r), cols.index(c)] = k
    fig = Figure(figsize=(max(4.0, 1.1 * len(cols) + 2.0), max(3.0, 0.4 * len(rows) + 1.8)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="rank")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([str(r) for r in rows], fontsize=8)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    if grid.size <= 600:
        vmax = np.nanmax(grid) if np.isfinite(grid).any() else 1.0
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=7,
                            color="black" if grid[i, j] > 0.6 * vmax else "white")
    ax.set_title(title or f"ranks (total {int(np.nansum(grid))})")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    return str(path)


def plot_budget(history: Sequence[Mapping[str, int]], path, target: int | None = None, title: str | None = None) -> str:
    """Budget schedule and kept weights vs step (``RankDynaCallback.history``); writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check(len(history) > 0, "no budget history to plot")
    hist = sorted(history, key=lambda h: h["step"])
    steps = [h["step"] for h in hist]
    fig = Figure(figsize=(6.0, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.step(steps, [h["budget"] for h in hist], where="post", label="budget")
    ax.plot(steps, [h["kept_params"] for h in hist], "o", ms=3, label="kept weights")
    if target is not None:
        ax.axhline(target, ls="--", color="gray", lw=1, label="target")
    ax.set_xlabel("step")
    ax.set_ylabel("weights (target layers)")
    ax.legend(fontsize=8)
    ax.set_title(title or "RankDyna budget")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    return str(path)
