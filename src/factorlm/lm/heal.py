"""Stage: heal the factors with a few optimizer steps of language-model fine-tuning (``--heal-steps``).

SVD-LLM's second stage ("parameter update") fine-tunes the factors; here through the project's
training loop (:class:`factorlm.train.loop.Trainer`: accelerate, ``--mixed-precision``), with the
next-token loss (``--heal-loss lm``) or the KL divergence to the dense model's next-token distribution
(``distill``).  The dense model is never a second resident copy: :class:`DenseTeacher` runs the
*student's* modules with the replaced dense target layers swapped back in for the teacher's forward
(no gradient), their weights kept on the CPU and moved to the compute device one layer at a time.
With ``--heal-params all`` the other parameters train too, so the teacher also holds a CPU snapshot of
those (a second copy of the non-target weights, on the CPU).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..errors import check
from ..models.surgery import get_module, linear_weight, set_module

TASK, METRIC = "lm", "perplexity"


class _Streamed(nn.Module):
    """A dense linear (or Conv1D) whose weights live on the CPU and visit the input's device per call."""

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.__dict__["dense"] = dense  # not a submodule: .to() / requires_grad_ never reach it
        self.weight_t = type(dense).__name__ == "Conv1D"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = linear_weight(self.dense).to(x.device, x.dtype, non_blocking=True)
        b = self.dense.bias
        b = None if b is None else b.to(x.device, x.dtype, non_blocking=True)
        return F.linear(x, W, b)


class DenseTeacher(nn.Module):
    """The dense model as a teacher without a second copy: ``student``'s modules with ``dense``
    (``{target: the replaced dense module}``) swapped in for the duration of a no-grad forward.

    ``frozen``: CPU snapshots ``{name: tensor}`` of the student's other parameters (taken before
    healing), passed to :func:`torch.func.functional_call` when those parameters train too."""

    def __init__(self, student: nn.Module, dense: dict[str, nn.Module], frozen: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.__dict__["student"] = student  # not registered: the callback's requires_grad_(False) must not freeze it
        self.__dict__["dense"] = dense
        self.__dict__["frozen"] = frozen or {}

    def to(self, *args, **kwargs):  # the weights stay offloaded; they are streamed per layer
        return self

    @contextlib.contextmanager
    def _swapped(self):
        student = self.student
        factored = {n: get_module(student, n) for n in self.dense}
        try:
            for n, d in self.dense.items():
                set_module(student, n, _Streamed(d))
            yield student
        finally:
            for n, m in factored.items():
                set_module(student, n, m)

    def forward(self, **inputs):
        student = self.student
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad(), self._swapped() as model:
                if self.frozen:
                    device = next(student.parameters()).device
                    params = {k: v.to(device, non_blocking=True) for k, v in self.frozen.items()}
                    return torch.func.functional_call(model, params, (), inputs, strict=False)
                return model(**inputs)
        finally:
            student.train(was_training)


def heal(model: nn.Module, windows: torch.Tensor, c: RunConfig, log, dense: dict[str, nn.Module] | None = None) -> dict[str, Any]:
    """``--heal-steps`` optimizer steps on calibration-text windows; only the factors train unless
    ``--heal-params all``.  ``dense``: the replaced dense target modules (the teacher of
    ``--heal-loss distill``, see :class:`DenseTeacher`).  The last weights are kept (no selection)."""
    from torch.utils.data import DataLoader, TensorDataset

    from ..train.distill import DistillationCallback
    from ..train.loop import TrainConfig, Trainer

    frozen_flags = {}
    for name, p in model.named_parameters():
        frozen_flags[name] = p.requires_grad
        is_factor = name.endswith(".A") or name.endswith(".B")
        p.requires_grad_(c.heal_params == "all" or is_factor)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class _Windows(TensorDataset):
        def __getitem__(self, i):
            ids = self.tensors[0][i]
            return {"input_ids": ids, "labels": ids}

    g = torch.Generator().manual_seed(c.seed)
    loader = DataLoader(_Windows(windows), batch_size=min(c.batch_size, len(windows)), shuffle=True, generator=g)

    class _Task:  # no evaluation during healing: the last weights are kept
        name, main_metric, is_regression = TASK, METRIC, False

    cfg = TrainConfig(learning_rate=c.learning_rate, weight_decay=0.0, max_steps=c.heal_steps,
                      warmup_ratio=c.warmup_ratio, seed=c.seed, mixed_precision=c.mixed_precision,
                      keep_best=False, progress=c.progress, name="heal", batch_size=c.batch_size)
    callbacks = []
    if c.heal_loss == "distill":
        check(dense is not None, "--heal-loss distill needs the dense target layers")
        factor_names = {f"{n}.{leaf}" for n in dense for leaf in ("A", "B", "bias")}
        snapshot = None
        if c.heal_params == "all":  # the other weights train too: the teacher keeps their dense values
            snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                        if k not in factor_names and not any(k.startswith(n + ".") for n in dense)}
        teacher = DenseTeacher(model, dense, snapshot)
        callbacks.append(DistillationCallback(teacher, alpha=1.0, temperature=1.0, scale_task_loss=True))
    what = "next-token loss" if c.heal_loss == "lm" else "KL to the dense model"
    log(f"[heal] {c.heal_steps} steps of {what} on {len(windows)} windows of calibration text (batch "
        f"{loader.batch_size}), {trainable:,} trainable parameters ({c.heal_params}), lr {c.learning_rate:g}")
    t0 = time.perf_counter()
    model.train()
    trainer = Trainer(model, loader, None, _Task(), cfg, callbacks=callbacks, log=log)
    try:
        trainer.fit()
        stopped = trainer.state.stopped
    finally:
        trainer.close()
    model.eval()
    for name, p in model.named_parameters():
        p.requires_grad_(frozen_flags.get(name, True))
    return {"steps": c.heal_steps, "loss": c.heal_loss, "windows": len(windows), "trainable_params": trainable,
            "params": c.heal_params, "learning_rate": c.learning_rate,
            "teacher": "dense target layers streamed from the CPU" if c.heal_loss == "distill" else None,
            "seconds": round(time.perf_counter() - t0, 1), **({"stopped": stopped} if stopped else {})}
