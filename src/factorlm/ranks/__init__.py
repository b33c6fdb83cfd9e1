"""Budgets (how much to keep) and rank allocation (where to keep it)."""

from .budget import Accounting, check_keep, fixed_plan, plan_params, uniform_plan

__all__ = ["Accounting", "check_keep", "fixed_plan", "plan_params", "uniform_plan"]
