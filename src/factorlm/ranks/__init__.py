"""Budgets (how much to keep) and rank allocation (where to keep it)."""

from .budget import (Accounting, break_even_rank, check_keep, fixed_plan, past_break_even, plan_params,
                     stored_weights, uniform_plan)

__all__ = ["Accounting", "break_even_rank", "check_keep", "fixed_plan", "past_break_even", "plan_params",
           "stored_weights", "uniform_plan"]
