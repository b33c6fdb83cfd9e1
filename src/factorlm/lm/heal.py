"""Stage: heal the factors with a few optimizer steps of language-model fine-tuning (``--heal-steps``).

SVD-LLM's second stage ("parameter update") fine-tunes the factors; here through the project's
training loop (:class:`factorlm.train.loop.Trainer`: accelerate, ``--mixed-precision``), with the
next-token loss (``--heal-loss lm``) or the KL divergence to the dense model's next-token distribution
(``distill``).  The dense model is never a second resident copy: :class:`DenseTeacher` runs the
*student's* modules with the replaced dense target layers swapped back in for the teacher's forward
(no gradient), their weights kept on the CPU and moved to the compute device one layer at a time.
With ``--heal-params all`` the other parameters train too, so the teacher also holds a CPU snapshot of
those (a second copy of the non-target weights, on the CPU).

Memory of a step (weights stay in the model's dtype, bf16 for most checkpoints):

* ``--heal-optimizer`` (:mod:`factorlm.train.optim`): ``auto`` = torchao's AdamW with stochastic rounding
  for bf16 weights (torch's AdamW silently drops most small updates of bf16 weights), ``adamw8bit`` =
  8-bit moments (2 bytes per trainable parameter instead of 4 in bf16 or 8 in fp32);
* ``--heal-update sequential``: SVD-LLM's sequential update, ``A`` (their W'_u) for the first half of
  the steps, then ``B`` (W'_v), each phase with a fresh optimizer, so gradients and moments exist for one
  factor at a time.  As published they train a LoRA on each factor; here the factor itself trains;
* ``--heal-checkpointing``: transformers' activation checkpointing (one block's activations at a time
  plus every block's input; one more forward per step).
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
from ..train.callbacks import Callback

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
                if self.frozen:  # each snapshot tensor where its live counterpart is (several GPUs: its block's)
                    live = {**dict(student.named_parameters()), **dict(student.named_buffers())}
                    fallback = next(student.parameters()).device
                    params = {k: v.to(live[k].device if k in live else fallback, non_blocking=True)
                              for k, v in self.frozen.items()}
                    return torch.func.functional_call(model, params, (), inputs, strict=False)
                return model(**inputs)
        finally:
            student.train(was_training)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """transformers' activation (gradient) checkpointing on or off.  Switching it on also makes the input
    embeddings' output require grad (a hook that ``..._disable`` leaves in place unless peft is loaded:
    removed here, or every later forward - FLOP counting, inference - would build a graph)."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


def heal_optimizer(c: RunConfig, model: nn.Module) -> str:
    """``--heal-optimizer auto``: torchao's AdamW with stochastic rounding for bf16 weights (torch's
    AdamW rounds most small updates of bf16 weights away), torch's AdamW otherwise."""
    if c.heal_optimizer != "auto":
        return c.heal_optimizer
    return "adamw-sr" if any(p.dtype == torch.bfloat16 for p in model.parameters()) else "adamw"


def _phases(c: RunConfig) -> list[tuple[str, int, tuple[str, ...]]]:
    """``(name, steps, trainable leaves)`` per phase: one joint phase, or SVD-LLM's sequential update
    (``A`` = W'_u first, then ``B`` = W'_v, half of the steps each)."""
    if c.heal_update == "joint":
        return [("heal", c.heal_steps, ("A", "B"))]
    first = (c.heal_steps + 1) // 2
    return [("heal-A", first, ("A",)), ("heal-B", c.heal_steps - first, ("B",))]


class _Curve(Callback):
    """``measure()`` (held-out perplexity) after the optimizer steps in ``at``, counted over every phase of
    the run (``offset`` = the steps of the phases before); the points share the run's schedule, and
    ``seconds`` is the healing wall time so far without the measurements (``measuring``)."""

    def __init__(self, at, measure):
        self.at, self.measure, self.offset, self.points = set(at), measure, 0, []
        self.t0, self.measuring = time.perf_counter(), 0.0

    def on_step_end(self, trainer) -> None:
        step = self.offset + trainer.state.step
        if step in self.at and not any(p["step"] == step for p in self.points):
            was = trainer.model.training
            trainer.model.eval()
            t = time.perf_counter()
            seconds = round(t - self.t0 - self.measuring, 1)  # training only
            with torch.no_grad():
                self.points.append({"step": step, "seconds": seconds, **self.measure()})
            self.measuring += time.perf_counter() - t
            trainer.model.train(was)


def heal(model: nn.Module, windows: torch.Tensor, c: RunConfig, log, dense: dict[str, nn.Module] | None = None,
         device: torch.device | None = None, measure=None) -> dict[str, Any]:
    """``--heal-steps`` optimizer steps on calibration-text windows; only the factors train unless
    ``--heal-params all``.  ``dense``: the replaced dense target modules (the teacher of
    ``--heal-loss distill``, see :class:`DenseTeacher`).  The last weights are kept (no selection).
    ``device``: where it trains (``--device``; default accelerate's choice, the first GPU when there is one).
    ``measure``: a no-argument function returning ``{"perplexity": ...}`` on held-out text, called at the
    steps of ``--heal-curve`` (the result's ``curve``).

    Memory (``--heal-update sequential``, ``--heal-optimizer adamw8bit``, ``--heal-checkpointing``): the
    gradients and optimizer state of one factor of every layer at a time, 8-bit moments, and the
    activations of one decoder block at a time plus every block's input (transformers' gradient
    checkpointing); BENCHMARKS.md "LLM scale" gives the measured formula."""
    from torch.utils.data import DataLoader, TensorDataset

    from ..train.distill import DistillationCallback
    from ..train.loop import TrainConfig, Trainer, make_accelerator

    check(not (c.heal_update == "sequential" and c.heal_params == "all"),
          "--heal-update sequential trains one factor at a time; it does not combine with --heal-params all")
    frozen_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    optimizer = heal_optimizer(c, model)

    class _Windows(TensorDataset):
        def __getitem__(self, i):
            ids = self.tensors[0][i]
            return {"input_ids": ids, "labels": ids}

    class _Task:  # no evaluation during healing: the last weights are kept
        name, main_metric, is_regression = TASK, METRIC, False

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
    curve = _Curve(c.heal_curve, measure) if c.heal_curve and measure is not None else None
    if curve is not None:
        callbacks.append(curve)
    checkpointing = c.heal_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    if c.heal_checkpointing:
        check(checkpointing, f"--heal-checkpointing: {type(model).__name__} does not support gradient checkpointing")
        _checkpointing(model, True)
    what = "next-token loss" if c.heal_loss == "lm" else "KL to the dense model"
    t0 = time.perf_counter()
    phases, stopped, trainable_max = [], None, 0
    try:
        for name, steps, leaves in _phases(c):
            if steps <= 0:
                continue
            for pname, p in model.named_parameters():
                is_factor = pname.rsplit(".", 1)[-1] in leaves and (pname.endswith(".A") or pname.endswith(".B"))
                p.requires_grad_(c.heal_params == "all" or is_factor)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            trainable_max = max(trainable_max, trainable)
            g = torch.Generator().manual_seed(c.seed + len(phases))
            loader = DataLoader(_Windows(windows), batch_size=min(c.batch_size, len(windows)), shuffle=True,
                                generator=g)
            cfg = TrainConfig(learning_rate=c.learning_rate, weight_decay=0.0, max_steps=steps,
                              warmup_ratio=c.warmup_ratio, seed=c.seed + len(phases),
                              mixed_precision=c.mixed_precision, optimizer=optimizer, keep_best=False,
                              progress=c.progress, name=name, batch_size=c.batch_size)
            log(f"[{name}] {steps} steps of {what} on {len(windows)} windows of calibration text (batch "
                f"{loader.batch_size}), {trainable:,} trainable parameters "
                f"({c.heal_params if c.heal_update == 'joint' else 'factor ' + leaves[0]}), lr {c.learning_rate:g}, "
                f"{optimizer}{', gradient checkpointing' if checkpointing else ''}")
            model.train()
            acc = None if device is None else make_accelerator(c.mixed_precision, cpu=device.type == "cpu")
            trainer = Trainer(model, loader, None, _Task(), cfg, callbacks=callbacks, log=log, accelerator=acc)
            try:
                with (torch.cuda.device(device) if device is not None and device.type == "cuda" else
                      contextlib.nullcontext()):
                    trainer.fit()
                stopped = trainer.state.stopped
            finally:
                trainer.close()
            phases.append({"name": name, "steps": steps, "trainable_params": trainable})
            if curve is not None:
                curve.offset += steps
            if stopped:
                break
    finally:
        if checkpointing:
            _checkpointing(model, False)
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(frozen_flags.get(name, True))
    return {"steps": c.heal_steps, "loss": c.heal_loss, "windows": len(windows), "trainable_params": trainable_max,
            "params": c.heal_params, "learning_rate": c.learning_rate, "optimizer": optimizer,
            "update": c.heal_update, "gradient_checkpointing": bool(checkpointing), "phases": phases,
            "teacher": "dense target layers streamed from the CPU" if c.heal_loss == "distill" else None,
            "seconds": round(time.perf_counter() - t0 - (curve.measuring if curve is not None else 0.0), 1),
            **({"stopped": stopped} if stopped else {}),
            **({"curve": curve.points, "curve_measure_seconds": round(curve.measuring, 1)} if curve is not None else {})}
