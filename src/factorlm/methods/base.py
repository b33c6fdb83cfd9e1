"""Method interface and registry.

A method is a recipe over the library's pieces.  It receives the session (task, data, training)
and a model, compresses the model in place or returns a new one, and reports what it did::

    @register_method("mymethod")
    class MyMethod(Method):
        @dataclass
        class Options:                 # become CLI flags --my-option and recipe keys
            my_option: float = 0.5
        def run(self, session, model) -> MethodResult: ...

Options fields become ``factorlm compress`` flags automatically (see :mod:`factorlm.cli`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..errors import FactorLMError
from ..registry import Registry


@dataclass
class MethodResult:
    model: nn.Module
    accounting: Any = None  # ranks.budget.Accounting
    info: dict[str, Any] = field(default_factory=dict)  # method-specific facts for factorlm.json
    extra_files: dict[str, Any] = field(default_factory=dict)  # saved beside the weights (plots, masks)


@dataclass
class NoOptions:
    pass


class Method:
    name: ClassVar[str] = "abstract"
    #: starts from a dense model fine-tuned on the task (the teacher); False = from pre-trained
    needs_teacher: ClassVar[bool] = True
    # factorizes with the budget plan of `methods.common.plan_for` (its speed check then applies)
    uses_plan: ClassVar[bool] = True
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = build_options(self.Options, options or {}, self.name)

    def validate(self, config, num_processes: int = 1) -> None:
        """Reject run settings this method cannot honour, before any work starts (one-line
        :class:`~factorlm.errors.FactorLMError`).  ``num_processes``: the distributed world size."""

    def run(self, session, model: nn.Module) -> MethodResult:  # pragma: no cover - interface
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    return METHODS.register(name, name_attr="name")


def build_options(options_cls, values: dict[str, Any], method: str):
    """Instantiate a method's Options dataclass; unknown keys are an error naming the known ones."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise FactorLMError(f"method {method!r} has no option {unknown[0]!r} (its options: {known})")
    return options_cls(**{k: v for k, v in values.items() if v is not None})


def get_method(name: str, options: dict[str, Any] | None = None) -> Method:
    return METHODS.get(name)(options)
