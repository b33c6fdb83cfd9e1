"""The fine-tuning loop every compression method shares.

Built on :class:`accelerate.Accelerator`: single process (CPU or one GPU) by default, and unchanged
under ``accelerate launch`` on many GPUs.  Methods customise training only through
:class:`~factorlm.train.callbacks.Callback` hooks (see the order there) and, if needed, custom
optimizer parameter groups.

One optimisation step (``gradient_accumulation_steps`` = k micro-batches)::

    on_step_begin                                      (once, before the first micro-batch)
    k x [forward -> compute_loss chain -> accelerator.backward]
    [fp16: unscale] -> on_after_backward (accumulated grads, unscaled, unclipped) -> clip -> optimizer.step
    -> scheduler.step -> zero_grad -> on_step_end -> [evaluate -> on_evaluate] -> [checkpoint]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import FactorLMError, check
from .callbacks import Callback
from .evaluate import evaluate as _evaluate
from .evaluate import main_score, model_inputs

__all__ = ["TrainConfig", "TrainState", "Trainer", "default_param_groups"]

logger = logging.getLogger("factorlm.train")

_MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Hyper-parameters of :class:`Trainer` (JSON-able via :meth:`to_dict`)."""

    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs: exactly this many optimizer steps
    batch_size: int = 32  # informational; loaders are built outside
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    seed: int = 0
    eval_every: int | None = None  # steps; None = at the end of every epoch (always at the end of training)
    log_every: int = 20
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    optimizer: str = "adamw"  # adamw | adamw-sr | adamw8bit (factorlm.train.optim)
    keep_best: bool = True  # restore the best weights by task.main_metric (higher is better) at the end
    checkpoint_dir: str | None = None
    save_every: int | None = None  # steps; needs checkpoint_dir
    progress: bool = True
    name: str = "train"  # the phase's name: progress bar, log lines, messages

    def __post_init__(self) -> None:
        check(self.learning_rate > 0, f"learning rate must be > 0, got {self.learning_rate}")
        check(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        check(self.max_steps is not None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        check(self.max_steps is None or self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        check(0 <= self.warmup_ratio < 1, f"warmup ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.eval_every is None or self.eval_every > 0, f"eval_every must be > 0, got {self.eval_every}")
        check(self.log_every > 0, f"log_every must be > 0, got {self.log_every}")
        check(self.gradient_accumulation_steps >= 1,
              f"gradient accumulation steps must be >= 1, got {self.gradient_accumulation_steps}")
        check(self.mixed_precision in _MIXED_PRECISION,
              f"mixed precision must be one of {', '.join(_MIXED_PRECISION)}, got {self.mixed_precision!r}")
        check(self.save_every is None or self.save_every > 0, f"save_every must be > 0, got {self.save_every}")
        check(self.save_every is None or self.checkpoint_dir is not None, "save_every needs a checkpoint_dir")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainState:
    """What hooks read (``trainer.state``).

    ``history`` holds dicts with ``kind`` = ``"train"`` (``step, epoch, loss, lr, examples_per_s``;
    ``loss`` = mean of the callback-augmented loss over the logging window) or ``"eval"``
    (``step, epoch`` + the eval metrics).
    """

    step: int = 0  # finished optimizer steps
    total_steps: int = 0
    epoch: float = 0.0  # step / steps_per_epoch
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None  # why training stopped before total_steps (e.g. a non-finite loss)
    seconds_per_step: float | None = None  # measured over the first steps (the time estimate)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_accelerator(mixed_precision: str | None = None, **kwargs):
    """An ``accelerate.Accelerator`` with this ``mixed_precision``, also when an earlier one in this
    process used another.

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a second ``Accelerator`` whose
    mixed precision differs ("restart your runtime"), so a notebook or a benchmark that fine-tunes in
    fp32 and then in bf16 would fail. The mixed-precision state is reset then; the process group
    (``PartialState``) is kept, so a distributed launch is untouched.  The state is shared by every
    accelerator of the process: one made before the reset now reports (and autocasts to) the new
    precision, so make a new one before training with it again (``Session.accelerator`` does).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if mixed_precision is not None and shared and shared.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
        "norm" in type(module).__name__.lower()


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and no decay for biases and normalisation weights.

    Only parameters with ``requires_grad`` are included; shared (tied) parameters appear once.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if _is_norm(module):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, nodecay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in no_decay or name.rsplit(".", 1)[-1].endswith("bias"):
            nodecay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if nodecay:
        groups.append({"params": nodecay, "weight_decay": 0.0})
    return groups


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            if torch.is_tensor(v) and v.dim() > 0:
                return int(v.shape[0])
    return 0


class Trainer:
    """Fine-tune ``model`` on ``train_loader``; evaluate on ``eval_loaders`` (split name -> loader).

    ``model(**batch)`` must return an object with ``.loss`` (and ``.logits`` for evaluation), like
    any Hugging Face ``*ForSequenceClassification`` model given ``labels``.

    Attributes hooks may use: ``model`` (prepared, possibly DDP-wrapped; :attr:`unwrapped_model`
    is the plain module, the very object passed in), ``optimizer``, ``lr_scheduler`` (both
    prepared), ``accelerator``, ``state`` (:class:`TrainState`), ``config``, ``task``, ``callbacks``.

    ``accelerator``: pass one to share it (e.g. a distributed launch or custom plugins); its
    ``gradient_accumulation_steps`` is set from ``config``, but its ``mixed_precision`` is used as
    it is.  When omitted, one is created with ``config.mixed_precision``.
    ``param_groups(unwrapped_model) -> list[dict]`` overrides :func:`default_param_groups` (groups
    without ``weight_decay`` get ``config.weight_decay``; frozen parameters are dropped).
    ``eval_loaders`` are what keep-best selects on (a held-out slice of the training data, never the
    reported dev set).  ``log(msg)`` receives the user-facing lines (time estimate, evaluations, a
    stop); default: the ``factorlm.train`` logger.

    A non-finite training loss stops the phase before it reaches the weights: ``state.stopped`` says
    why, and the best weights so far (keep-best) or the last finite ones are kept.
    """

    def __init__(self, model: nn.Module, train_loader, eval_loaders: dict[str, Any] | None, task,
                 config: TrainConfig, callbacks: Sequence[Callback] = (), accelerator=None,
                 param_groups: Callable[[nn.Module], list[dict]] | None = None,
                 log: Callable[[str], None] | None = None):
        from accelerate.utils import set_seed

        self.config = config
        self.task = task
        self._log = log
        self.callbacks: list[Callback] = list(callbacks)
        if accelerator is None:
            accelerator = make_accelerator(config.mixed_precision,
                                           gradient_accumulation_steps=config.gradient_accumulation_steps)
        self.accelerator = accelerator
        self.accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
        set_seed(config.seed)

        groups = param_groups(model) if param_groups is not None else \
            default_param_groups(model, config.weight_decay)
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
        groups = [g for g in groups if g["params"]]
        check(bool(groups), "the model has no trainable parameters")
        from .optim import make_optimizer

        optimizer = make_optimizer(groups, config.optimizer, config.learning_rate, config.weight_decay)

        check(train_loader is not None, "no training data")
        self._module = model
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.eval_loaders = {name: accelerator.prepare(dl) for name, dl in (eval_loaders or {}).items()}

        try:
            n_batches = len(self.train_loader)
        except TypeError as e:  # pragma: no cover - iterable datasets
            raise FactorLMError("the training loader must have a length") from e
        check(n_batches > 0, "the training data is empty")
        self.steps_per_epoch = math.ceil(n_batches / config.gradient_accumulation_steps)
        total = config.max_steps if config.max_steps is not None else \
            math.ceil(config.epochs * self.steps_per_epoch)
        self.state = TrainState(total_steps=int(total))

        from transformers import get_linear_schedule_with_warmup

        # A prepared scheduler steps num_processes times per optimizer step (accelerate's convention).
        nproc = accelerator.num_processes
        warmup = math.ceil(config.warmup_ratio * total)
        scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup * nproc, max(total, 1) * nproc)
        self.lr_scheduler = accelerator.prepare(scheduler)

        self._best_state: dict[str, torch.Tensor] | None = None
        self._best_extra: dict[str, torch.Tensor] | None = None
        self.best_metrics: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self._last_eval_step: int | None = None
        self._pbar = None
        self._t_first = self._t_other = 0.0  # the time estimate's clock (see _estimate)

    def close(self) -> None:
        """Release everything this trainer prepared (the accelerator may be shared across phases:
        without this, every phase's wrapped model, optimizer, scheduler and loaders stay referenced
        by it).  The unwrapped model, the very object passed in, is untouched.  Idempotent."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.accelerator.free_memory()
        self.model = self.optimizer = self.lr_scheduler = self.train_loader = None
        self.eval_loaders = {}
        self._best_state = self._best_extra = None

    # ------------------------------------------------------------------------------------------
    @property
    def unwrapped_model(self) -> nn.Module:
        if self.model is None:  # closed
            return self._module
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, msg: str) -> None:
        """A user-facing line (main process only), printed above the progress bar when one is shown."""
        if not self.is_main_process:
            return
        if self._pbar is not None and not self._pbar.disable:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)
        elif self._log is not None:
            self._log(msg)
        else:
            logger.info(msg)

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def compute_loss(self, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, dict):
            loss = outputs.get("loss")
        if loss is None:
            raise FactorLMError("the model returned no loss; are 'labels' in the training batches?")
        for cb in self.callbacks:
            loss = cb.compute_loss(self, batch, outputs, loss)
        return loss

    # -- evaluation / best weights --------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Metrics of the current weights on every eval loader (``{}`` without eval loaders)."""
        return _evaluate(self.model, self.eval_loaders, self.task, self.accelerator)

    def _snapshot(self) -> None:
        sd = self.accelerator.get_state_dict(self.model)
        self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
        # non-persistent buffers (e.g. masks registered with persistent=False) are not in state_dict
        self._best_extra = {k: b.detach().to("cpu", copy=True)
                            for k, b in self.unwrapped_model.named_buffers() if k not in sd}

    def _restore_best(self) -> None:
        if self._best_state is None:
            return
        model = self.unwrapped_model
        model.load_state_dict(self._best_state)
        if self._best_extra:
            bufs = dict(model.named_buffers())
            with torch.no_grad():
                for k, v in self._best_extra.items():
                    if k in bufs and bufs[k].shape == v.shape:
                        bufs[k].copy_(v)

    def _run_eval(self) -> dict[str, float]:
        # factorlm.train.evaluate forks the CPU RNG, so how often a run evaluates leaves its training alone
        # (an override of Trainer.evaluate that does not call it must fork too)
        metrics = self.evaluate()
        self._last_eval_step = self.state.step
        if not metrics:
            return metrics
        self.last_metrics = metrics
        score = main_score(metrics, self.task.main_metric)
        if self.state.best_metric is None or score > self.state.best_metric:
            self.state.best_metric = score
            self.state.best_step = self.state.step
            self.best_metrics = dict(metrics)
            if self.config.keep_best:
                self._snapshot()
        self.state.history.append({"kind": "eval", "step": self.state.step, "epoch": self.state.epoch, **metrics})
        msg = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        self.say(f"[{self.config.name}] step {self.state.step}/{self.state.total_steps} selection: {msg}")
        self._call("on_evaluate", metrics)
        return metrics

    def save_checkpoint(self, path: str | None = None) -> str:
        """``accelerator.save_state`` + ``trainer_state.json`` + callbacks' ``state_dict`` (``callbacks.pt``)."""
        path = path or os.path.join(self.config.checkpoint_dir or ".", f"step-{self.state.step}")
        self.accelerator.save_state(path)
        if self.is_main_process:
            with open(os.path.join(path, "trainer_state.json"), "w") as f:
                json.dump({"state": self.state.to_dict(), "config": self.config.to_dict()}, f, indent=1)
            torch.save([cb.state_dict() for cb in self.callbacks], os.path.join(path, "callbacks.pt"))
            from ..models.io import apply_umask_modes  # safetensors writes 0600 files

            apply_umask_modes(path)
        self.accelerator.wait_for_everyone()
        return path

    # -- training -------------------------------------------------------------------------------
    _ESTIMATE_AFTER = 5  # steps timed (after the first, which pays one-off costs) for the time estimate

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach())).any().float()
        if self.accelerator.num_processes > 1:  # every rank must stop together
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bool(bad.item() > 0)

    def _stop(self, why: str) -> None:
        self.state.stopped = why
        kept = "the best weights so far" if self.config.keep_best and self.eval_loaders else "the last weights"
        self.say(f"[{self.config.name}] stopped: {why}; keeping {kept}")

    def _estimate(self) -> None:
        """Time the first steps and say how long the phase will take (training steps only:
        evaluations and checkpoints in between are subtracted)."""
        state, k = self.state, self._ESTIMATE_AFTER
        if state.step == 1:
            self._t_first = time.perf_counter()
            self._t_other = 0.0  # evaluations / checkpoints from here on are not training time
        elif state.step == 1 + k and state.total_steps > 1 + k:
            per_step = (time.perf_counter() - self._t_first - self._t_other) / k
            state.seconds_per_step = per_step
            left = per_step * (state.total_steps - state.step)
            self.say(f"[{self.config.name}] {state.total_steps} steps at {per_step:.2f} s/step: "
                     f"about {_duration(left)} left (estimated from steps 2-{1 + k}, evaluations not included)")

    def fit(self) -> dict[str, float]:
        """Train for ``state.total_steps`` optimizer steps.

        Returns the best eval metrics (``keep_best``, model restored to the best weights) or the final
        ones (``keep_best=False``); ``{}`` without eval loaders (final weights kept).
        """
        from tqdm.auto import tqdm

        cfg, acc, state = self.config, self.accelerator, self.state
        acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._pbar = None
        self.model.train()
        self._call("on_train_begin")
        self._pbar = tqdm(total=state.total_steps, disable=not (cfg.progress and self.is_main_process),
                          desc=cfg.name, dynamic_ncols=True)
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

        win_loss = torch.zeros((), device=acc.device)
        step_loss = torch.zeros((), device=acc.device)  # this optimizer step's loss (all micro-batches)
        win_micro = 0
        win_examples = 0
        win_t0 = time.perf_counter()
        micro_in_step = 0
        done = state.step >= state.total_steps
        while not done:
            for batch in self.train_loader:
                if micro_in_step == 0:
                    self._call("on_step_begin")
                with acc.accumulate(self.model):
                    outputs = self.model(**model_inputs(batch, labels=True))
                    loss = self.compute_loss(batch, outputs)
                    acc.backward(loss)
                    step_loss += loss.detach().float()
                    win_loss += loss.detach().float()
                    win_micro += 1
                    win_examples += _batch_size(batch)
                    micro_in_step += 1
                    if not acc.sync_gradients:
                        continue
                    micro_in_step = 0
                    if self._nonfinite(step_loss):  # stop before a NaN/Inf reaches the weights
                        self.optimizer.zero_grad(set_to_none=True)
                        self._stop(f"the training loss became non-finite at step {state.step + 1}/{state.total_steps}"
                                   + (f" ({step_loss.item()})" if acc.num_processes == 1 else " (on some process)"))
                        done = True
                        break
                    step_loss.zero_()
                    # hooks that read gradients (PLATON, RankDyna, ...) must see them unscaled: under
                    # fp16 loss scaling unscale first (once per step), then clip without unscaling again
                    scaler = getattr(acc, "scaler", None)
                    scaled = scaler is not None
                    if scaled:  # GradScaler records it: its step() will not unscale a second time
                        scaler.unscale_(getattr(self.optimizer, "optimizer", self.optimizer))
                    self._call("on_after_backward")
                    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                        if scaled:
                            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                        else:
                            acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.epoch = state.step / self.steps_per_epoch
                self._call("on_step_end")
                self._pbar.update(1)
                done = state.step >= state.total_steps
                self._estimate()

                if state.step % cfg.log_every == 0 or done:
                    mean_loss = acc.reduce(win_loss / max(win_micro, 1), reduction="mean").item()
                    dt = max(time.perf_counter() - win_t0, 1e-9)
                    lr = float(self.lr_scheduler.get_last_lr()[0])
                    rec = {"kind": "train", "step": state.step, "epoch": state.epoch, "loss": mean_loss,
                           "lr": lr, "examples_per_s": win_examples * acc.num_processes / dt}
                    state.history.append(rec)
                    self._pbar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                                           ex_s=f"{rec['examples_per_s']:.1f}", refresh=False)
                    if self.is_main_process and self._pbar.disable:
                        logger.info("step %d/%d loss=%.4f lr=%.3e %.1f ex/s", state.step, state.total_steps,
                                    mean_loss, lr, rec["examples_per_s"])
                    win_loss.zero_()
                    win_micro = win_examples = 0
                    win_t0 = time.perf_counter()

                epoch_end = state.step % self.steps_per_epoch == 0
                if self.eval_loaders and (
                        (cfg.eval_every is not None and state.step % cfg.eval_every == 0)
                        or (cfg.eval_every is None and epoch_end and not done)):
                    t = time.perf_counter()
                    self._run_eval()
                    self.model.train()
                    self._t_other += time.perf_counter() - t
                if cfg.save_every is not None and state.step % cfg.save_every == 0:
                    t = time.perf_counter()
                    self.save_checkpoint()
                    self._t_other += time.perf_counter() - t
                if done:
                    break
        # leaving the train loader early (max_steps) skips accelerate's end-of-iteration cleanup
        end = getattr(self.train_loader, "end", None)
        if callable(end):
            end()
        self._pbar.close()
        if self.eval_loaders and self._last_eval_step != state.step:
            self._run_eval()
        if self.eval_loaders and cfg.keep_best and self._best_state is not None:
            self._restore_best()
            result = dict(self.best_metrics)
        else:
            result = dict(self.last_metrics)
        if state.stopped:
            bad = next((n for n, p in self.unwrapped_model.named_parameters() if not torch.isfinite(p).all()), None)
            if bad is not None:
                raise FactorLMError(f"[{cfg.name}] {state.stopped}, and the weights kept are not finite ({bad}); "
                                    "lower the learning rate or use --mixed-precision no")
        self._best_state = self._best_extra = None  # free memory
        self.model.train()
        self._call("on_train_end")
        return result


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
