"""A run's shared context: the task, its data, the tokenizer, loaders and the training entry points.

Methods receive a :class:`Session` and never deal with files, tokenisation or accelerate
themselves: ``session.finetune(model, phase=..., callbacks=[...])`` trains with the run's settings,
``session.evaluate(model)`` scores it, ``session.log(...)`` talks to the user.

Honest scores: keep-best selects on ``data.select``, a held-out slice of the training split
(``--selection-size``), and every phase is then reported on the dev split, which nothing selects on.
The session watches for runs that should not pass as ordinary scores: a phase whose loss became
non-finite, predictions collapsed to one class (or a constant), a phase that ended below where it
started, a final score no better than the majority-class baseline. Each becomes a line in
:attr:`Session.warnings` and a flag in :attr:`Session.health` (both saved in ``factorlm.json``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Sequence

from torch import nn

from .config import RunConfig
from .errors import FactorLMError


class Session:
    def __init__(self, config: RunConfig, *, quiet: bool = False):
        self.config = config.validate()
        self.quiet = quiet
        self.phases: dict[str, dict[str, Any]] = {}  # phase name -> eval metrics (+ steps)
        self.predictions: dict[str, dict[str, dict[str, list]]] = {}  # phase -> split -> dev preds / labels
        self.total_train_steps = 0
        self._tokenizer = None
        self.teacher: dict[str, Any] | None = None  # set by api.ensure_teacher
        self.fixed_null_threshold: float | None = None  # SQuAD 2.0: a saved model's (see null_threshold)
        self.warnings: list[str] = []
        self.health: dict[str, Any] = {"collapsed": [], "diverged": [], "worse_than_start": [],
                                       "below_baseline": False, "teacher_below_baseline": False}

    # -- user output ----------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if not self.quiet and self.accelerator.is_main_process:
            print(msg, file=sys.stderr, flush=True)

    # -- lazily built pieces ---------------------------------------------------------------------
    @property
    def accelerator(self):
        """This run's ``accelerate.Accelerator``, made on first use.  accelerate's mixed-precision
        state is process-wide: when another session has since switched it to another precision, the
        accelerator is made again, so this session never trains in the other one's precision."""
        from .train.loop import make_accelerator

        acc, made_with = self.__dict__.get("_accelerator"), self.__dict__.get("_accelerator_precision")
        if acc is None or acc.mixed_precision != made_with:
            acc = self.__dict__["_accelerator"] = make_accelerator(self.config.mixed_precision)
            self.__dict__["_accelerator_precision"] = acc.mixed_precision  # as accelerate set it
        return acc

    @functools.cached_property
    def task(self):
        from .data import resolve_task

        return resolve_task(self.config.task, **self._file_options())

    @functools.cached_property
    def data(self):
        from .data import load_task_data

        c = self.config
        return load_task_data(self.task, data_dir=c.data_dir, max_train_samples=c.max_train_samples,
                              max_eval_samples=c.max_eval_samples, seed=c.seed, selection_size=c.selection_size,
                              split_by_article=c.split_by_article, **self._file_options())

    def _file_options(self) -> dict:
        """The generic csv/jsonl task's file and column options (None for built-in tasks)."""
        c = self.config
        return {"train_file": c.train_file, "dev_file": c.dev_file, "label_column": c.label_column,
                "text_columns": tuple(c.text_columns) if c.text_columns else None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise FactorLMError("internal: tokenizer not set (load a model first)")
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self._tokenizer = tok

    def train_loader(self, batch_size: int | None = None, with_index: bool = False):
        """Shuffled training batches (``--group-by-length``: of similar lengths); ``with_index`` adds
        each example's index (the Trainer's loaders: teacher logits are cached by it)."""
        from .data import make_dataloader

        if self.task.is_qa:
            return self._qa_loader(self.data.train, batch_size or self.config.batch_size, train=True)
        return make_dataloader(
            self.data.train, self.tokenizer, batch_size=batch_size or self.config.batch_size,
            max_length=self.config.max_length, shuffle=True, seed=self.config.seed,
            group_by_length=self.config.group_by_length, with_index=with_index,
        )

    @functools.cached_property
    def eval_loaders(self):
        """The reported evaluation splits (dev; never used to select)."""
        return {split: self._eval_loader(ex) for split, ex in self.data.evals.items()}

    @functools.cached_property
    def select_loaders(self):
        """``{"select": loader}`` over the held-out training slice keep-best selects on ({} if none)."""
        return {"select": self._eval_loader(self.data.select)} if self.data.select else {}

    def _qa_loader(self, examples, batch_size: int, train: bool = False):
        from .data.qa import make_qa_dataloader

        c = self.config
        return make_qa_dataloader(examples, self.tokenizer, batch_size=batch_size, max_length=c.max_length,
                                  doc_stride=c.doc_stride, train=train, shuffle=train, seed=c.seed, n_best=c.n_best,
                                  max_answer_length=c.max_answer_length, version_2=self.task.version_2)

    def _eval_loader(self, examples):
        from .data import make_dataloader

        if self.task.is_qa:
            return self._qa_loader(examples, self.config.eval_batch_size)
        return make_dataloader(examples, self.tokenizer, batch_size=self.config.eval_batch_size,
                               max_length=self.config.max_length, is_regression=self.task.is_regression)

    @functools.cached_property
    def baseline(self) -> dict[str, float]:
        """Dev metrics of always predicting the training set's majority class ({} for regression);
        QA: of a trivial reader (:func:`~factorlm.train.evaluate_qa.qa_baseline`)."""
        import numpy as np

        from .train.evaluate import majority_baseline

        if self.task.is_qa:
            from .train.evaluate import _merge
            from .train.evaluate_qa import qa_baseline

            return _merge({s: qa_baseline(ex, self.task.version_2, self.data.train, self.data.select)
                           for s, ex in self.data.evals.items()}, list(self.data.evals))

        train = [e.label for e in self.data.train] + [e.label for e in self.data.select]
        return majority_baseline(self.task, {s: np.array([e.label for e in ex]) for s, ex in self.data.evals.items()},
                                 np.array(train) if train else None)

    # -- training / evaluation -------------------------------------------------------------------
    def train_config(self, *, epochs: float | None = None, learning_rate: float | None = None,
                     max_steps: int | None = None, keep_best: bool = True, phase: str = "train"):
        from .train import TrainConfig

        c = self.config
        steps = c.max_steps if max_steps is None else (max_steps if c.max_steps is None else min(max_steps, c.max_steps))
        return TrainConfig(
            learning_rate=learning_rate or c.learning_rate,
            weight_decay=c.weight_decay,
            epochs=c.epochs if epochs is None else epochs,
            max_steps=steps,
            batch_size=c.batch_size,
            warmup_ratio=c.warmup_ratio,
            seed=c.seed,
            eval_every=c.eval_every,
            mixed_precision=c.mixed_precision,
            keep_best=keep_best,
            progress=c.progress and not self.quiet,
            checkpoint_dir=c.checkpoint_dir,
            save_every=c.save_every,
            name=phase,
        )

    def finetune(
        self,
        model: nn.Module,
        *,
        phase: str,
        callbacks: Sequence[Any] = (),
        epochs: float | None = None,
        learning_rate: float | None = None,
        max_steps: int | None = None,
        keep_best: bool = True,
        param_groups: Any = None,
    ) -> dict[str, float]:
        """Train ``model`` in place on the task; returns the kept model's **dev** metrics.

        With ``keep_best`` the weights kept are the best on the held-out selection slice (if there
        is one; else the last), and a phase whose kept weights score below its starting weights on
        that slice is flagged ``worse_than_start`` (phases without keep-best, such as pruning, which
        trades score for sparsity by design, and runs with ``--selection-size 0`` are not checked).  ``param_groups(model) -> list[dict]`` overrides the optimizer groups
        (e.g. movement pruning's learned scores at their own learning rate)."""
        from .train import Trainer
        from .train.evaluate import main_score, metric_name

        cfg = self.train_config(epochs=epochs, learning_rate=learning_rate, max_steps=max_steps,
                                keep_best=keep_best, phase=phase)
        select = self.select_loaders
        start = None
        if keep_best and select:  # where the phase starts, to flag one that ends below it
            from .train import evaluate

            model.to(self.accelerator.device)
            start = main_score(evaluate(model, select, self.task), self.task.main_metric)
        trainer = Trainer(model, self.train_loader(with_index=True), select, self.task, cfg, callbacks=callbacks,
                          accelerator=self.accelerator, param_groups=param_groups, log=self.log)
        n_sel = len(self.data.select)
        self.log(f"[{phase}] training: {len(self.data.train):,} examples, {trainer.state.total_steps} steps "
                 f"({trainer.state.total_steps / trainer.steps_per_epoch:.3g} epochs), lr {cfg.learning_rate:g}, "
                 f"batch {cfg.batch_size}; "
                 + (f"keeping the best weights on {n_sel:,} held-out training examples" if keep_best and n_sel else
                    "keeping the last weights"))
        try:
            selected = trainer.fit()
        finally:
            trainer.close()  # the accelerator is shared by every phase: release what this one prepared
        self.total_train_steps += trainer.state.step
        extra: dict[str, Any] = {"steps": trainer.state.step}
        if trainer.state.seconds_per_step:
            extra["seconds_per_step"] = round(trainer.state.seconds_per_step, 4)
        if selected:  # the held-out score of the weights kept (the best with keep_best, else the last)
            name = metric_name(selected, self.task.main_metric)
            extra["select_" + name] = end = main_score(selected, self.task.main_metric)
            if keep_best:
                extra["best_step"] = trainer.state.best_step
            if start is not None and end < start:
                self.health["worse_than_start"].append(phase)
                self._warn(f"[{phase}] ended worse than it started on the held-out selection slice "
                           f"({name} {start:.4f} -> {end:.4f})")
        if trainer.state.stopped:
            self.health["diverged"].append(phase)
            self._warn(f"[{phase}] training stopped early: {trainer.state.stopped}")
        return self.evaluate(model, phase=phase, **extra)

    def _warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)
        self.log("WARNING: " + msg)

    def evaluate(self, model: nn.Module, phase: str | None = None, *, check: bool = True, **extra: Any) -> dict[str, float]:
        """Dev metrics of ``model``; with ``phase``, recorded (with ``extra``) and, with ``check``,
        checked for collapse (``check=False`` for an intermediate state expected to be poor, such as
        a one-shot factorization before its fine-tune)."""
        from .train import evaluate

        model.to(self.accelerator.device)
        stats: dict[str, dict[str, float]] = {}
        metrics = evaluate(model, self.eval_loaders, self.task, accelerator=None, stats=stats,
                           null_threshold=self.null_threshold(model))
        per_example = {split: (st.pop("_preds", None), st.pop("_labels", None)) for split, st in stats.items()}
        if phase:  # the dev predictions per example (a paired bootstrap over the dev set needs them)
            self.predictions[phase] = {s: {"preds": p.tolist(), "labels": y.tolist()}
                                       for s, (p, y) in per_example.items() if p is not None}
        if phase:
            self.record(phase, metrics, **extra)
            if check:
                self.check_collapse(phase, stats)
        return metrics

    def null_threshold(self, model: nn.Module) -> float | None:
        """SQuAD 2.0: the null threshold ``model`` gets on the held-out selection slice (0.0, the usual
        fixed value, without one); None for every other task.  The dev split never chooses its own."""
        if not (self.task.is_qa and self.task.version_2):
            return None
        if self.fixed_null_threshold is not None:
            return self.fixed_null_threshold
        if not self.select_loaders:
            if not getattr(self, "_said_no_threshold", False):
                self._said_no_threshold = True
                self.log("SQuAD 2.0: no selection slice (--selection-size 0), so the null threshold is the usual 0")
            return 0.0
        from .train import evaluate

        return float(evaluate(model, self.select_loaders, self.task)["null_threshold"])

    MIN_COLLAPSE_EXAMPLES = 16

    def check_collapse(self, phase: str, stats: dict[str, dict[str, float]]) -> None:
        """Flag predictions that ignore the input: one class for every example, or a constant score."""
        for split, st in stats.items():
            if st.get("n", 0) < self.MIN_COLLAPSE_EXAMPLES:  # too few to tell a collapse from chance
                continue
            if self.task.is_regression:
                bad = st.get("nonfinite", 0) > 0 or st.get("pred_std", 0.0) <= 1e-3 * st.get("label_std", 0.0)
                what = "a (nearly) constant or non-finite score"
            elif self.task.is_qa:
                bad = st.get("top_class_share", 0.0) >= 1.0
                what = "the same answer for every question"
            else:
                bad = st.get("top_class_share", 0.0) >= 1.0
                what = "one class for every example"
            if bad:
                if phase not in self.health["collapsed"]:
                    self.health["collapsed"].append(phase)
                self._warn(f"[{phase}] collapsed: the model predicts {what} on {split} ({int(st['n'])} examples)")

    def check_final(self, metrics: dict[str, float], what: str = "final") -> None:
        """A score no better than always predicting the majority class: the run's final one (flagged
        ``below_baseline``), or the dense teacher's (``what="dense teacher's"``, flagged
        ``teacher_below_baseline``: everything distilled or factorized from it inherits the problem)."""
        from .train.evaluate import main_score

        base = self.baseline
        if not base or not metrics:
            return
        score, floor = main_score(metrics, self.task.main_metric), main_score(base, self.task.main_metric)
        if score <= floor:
            self.health["below_baseline" if what == "final" else "teacher_below_baseline"] = True
            base = "trivial reader's (first words of the context)" if self.task.is_qa else "majority-class baseline's"
            self._warn(f"the {what} {self.task.main_metric} {score:.4f} is no better than the {base} {floor:.4f}")

    def record(self, phase: str, metrics: dict[str, float], **extra: Any) -> None:
        # counts (a cached phase's "steps") stay integers; metrics become plain floats
        self.phases[phase] = {**{k: v if type(v) is int else float(v) for k, v in metrics.items()}, **extra}
        shown = " ".join(f"{k}={float(v):.4f}" for k, v in metrics.items())
        if shown:
            self.log(f"[{phase}] {'/'.join(self.data.evals)}: {shown}")

    def main_score(self, metrics: dict[str, float]) -> float:
        return float(metrics[self.task.main_metric])
