"""Tests of factorlm.train: the accelerate-based loop, evaluation, hooks and distillation.

Tiny random BERT (2 layers, hidden 32) on a synthetic, learnable task: label = token 5 appears.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from factorlm.errors import FactorLMError
from factorlm.train import (Callback, DistillationCallback, Trainer, TrainConfig, TrainState, default_param_groups,
                            distillation_loss, evaluate, predict)

torch.set_num_threads(1)

SEQ = 8


def make_model(num_labels=2, seed=0, dropout=0.1):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=16,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def make_data(n, seed, regression=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 100, (n, SEQ), generator=g)
    ids[:, 0] = 1  # [CLS]
    has5 = torch.rand(n, generator=g) < 0.5
    pos = torch.randint(1, SEQ, (n,), generator=g)
    ids[has5, pos[has5]] = 5
    labels = has5.float() if regression else has5.long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def loaders(n_train=256, n_eval=128, bs=16, regression=False, seed=0, splits=("dev",)):
    train = DataLoader(make_data(n_train, seed, regression), batch_size=bs, shuffle=True)
    evals = {s: DataLoader(make_data(n_eval, 100 + i, regression), batch_size=32) for i, s in enumerate(splits)}
    return train, evals


class AccTask:
    is_regression = False
    main_metric = "accuracy"
    eval_splits = ("dev",)

    def compute_metrics(self, preds, labels):
        return {"accuracy": float((preds == labels).mean())}


class RegTask:
    is_regression = True
    main_metric = "pearson"
    eval_splits = ("dev",)

    def compute_metrics(self, preds, labels):
        return {"pearson": float(np.corrcoef(preds, labels)[0, 1]), "mse": float(((preds - labels) ** 2).mean())}


def cfg(**kw):
    base = dict(learning_rate=2e-3, weight_decay=0.01, epochs=1, warmup_ratio=0.1, progress=False, log_every=1,
                seed=0)
    base.update(kw)
    return TrainConfig(**base)


def train_logs(state: TrainState):
    return [h for h in state.history if h["kind"] == "train"]


def eval_logs(state: TrainState):
    return [h for h in state.history if h["kind"] == "eval"]


def sd_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
def test_learns_synthetic_task():
    model = make_model()
    train, evals = loaders()
    before = evaluate(model, evals, AccTask())["accuracy"]
    t = Trainer(model, train, evals, AccTask(), cfg(epochs=4, log_every=4))
    metrics = t.fit()
    logs = train_logs(t.state)
    assert t.state.step == t.state.total_steps == 4 * 16
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    assert metrics["accuracy"] >= 0.85 > before + 0.2
    assert len(eval_logs(t.state)) == 4  # once per epoch, the last one doubling as the final eval
    assert all(h["examples_per_s"] > 0 and h["lr"] >= 0 for h in logs)
    # the passed-in object is the trained model (single process: prepare returns the same module)
    assert t.unwrapped_model is model
    assert evaluate(model, evals, AccTask())["accuracy"] == metrics["accuracy"]


def test_max_steps_exact_with_accumulation():
    class Count(Callback):
        def __init__(self):
            self.n = {"step_end": 0, "loss": 0, "begin": 0}

        def on_step_begin(self, trainer):
            self.n["begin"] += 1

        def compute_loss(self, trainer, batch, outputs, loss):
            self.n["loss"] += 1
            return loss

        def on_step_end(self, trainer):
            self.n["step_end"] += 1

    for max_steps, accum in [(2, 1), (3, 2), (20, 1)]:  # 20 > one epoch of 16 steps
        c = Count()
        train, _ = loaders()
        t = Trainer(make_model(), train, None, AccTask(), cfg(max_steps=max_steps, epochs=100,
                    gradient_accumulation_steps=accum), callbacks=[c])
        assert t.fit() == {}
        assert t.state.step == t.state.total_steps == max_steps
        assert c.n == {"step_end": max_steps, "begin": max_steps, "loss": max_steps * accum}
        assert t.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # linear decay reached 0


def test_fractional_epochs_and_steps_per_epoch():
    train, _ = loaders(n_train=64, bs=16)  # 4 batches
    t = Trainer(make_model(), train, None, AccTask(), cfg(epochs=1.5, gradient_accumulation_steps=3))
    assert t.steps_per_epoch == 2  # ceil(4 / 3): the last, short group still makes a step
    t.fit()
    assert t.state.step == 3 and t.state.epoch == pytest.approx(1.5)


def test_same_seed_same_weights():
    def run(seed):
        train, evals = loaders()
        model = make_model()
        Trainer(model, train, evals, AccTask(), cfg(max_steps=6, eval_every=3, seed=seed)).fit()
        return sd_copy(model)

    a, b, c = run(0), run(0), run(1)
    assert same_weights(a, b)
    assert not same_weights(a, c)  # dropout / shuffling follow the seed


def test_evaluate_leaves_the_global_rng_where_it_was():
    _, evals = loaders()
    model = make_model()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    list(evals["dev"])  # a bare pass over a DataLoader does move it (the fork below is not a no-op)
    assert not torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    evaluate(model, evals, AccTask())
    assert torch.equal(torch.get_rng_state(), before)


def test_evaluation_frequency_leaves_training_unchanged():
    # evaluating (its DataLoader draws a base seed from the global RNG) must not shift the dropout
    # stream training sees: the same run evaluated every step or only at the end trains the same weights
    def run(eval_every):
        train, evals = loaders()
        model = make_model()
        Trainer(model, train, evals, AccTask(), cfg(max_steps=6, eval_every=eval_every, keep_best=False)).fit()
        return sd_copy(model)

    assert same_weights(run(1), run(None))
    assert same_weights(run(2), run(None))


def test_hook_order_and_grad_visibility():
    events = []

    class Rec(Callback):
        def on_train_begin(self, trainer):
            events.append("train_begin")

        def on_step_begin(self, trainer):
            events.append("step_begin")

        def compute_loss(self, trainer, batch, outputs, loss):
            assert outputs.logits.shape == (16, 2) and loss.requires_grad
            assert all(p.grad is None for p in trainer.model.parameters())
            events.append("compute_loss")
            return loss

        def on_after_backward(self, trainer):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())
            events.append("after_backward")

        def on_step_end(self, trainer):
            assert all(p.grad is None for p in trainer.model.parameters())  # zero_grad happened
            events.append(f"step_end{trainer.state.step}")

        def on_evaluate(self, trainer, metrics):
            assert "accuracy" in metrics and trainer.model.training  # eval mode was restored
            events.append(f"evaluate{trainer.state.step}")

        def on_train_end(self, trainer):
            events.append("train_end")

    train, evals = loaders()
    Trainer(make_model(), train, evals, AccTask(), cfg(max_steps=3, eval_every=2), callbacks=[Rec()]).fit()
    step = ["step_begin", "compute_loss", "after_backward"]
    assert events == ["train_begin", *step, "step_end1", *step, "step_end2", "evaluate2", *step, "step_end3",
                      "evaluate3", "train_end"]


def test_compute_loss_chain_changes_logged_loss():
    seen = []

    class AddThree(Callback):
        def compute_loss(self, trainer, batch, outputs, loss):
            return loss + 3.0

    class Spy(Callback):
        def compute_loss(self, trainer, batch, outputs, loss):
            seen.append((float(outputs.loss.detach()), float(loss.detach())))
            return loss

    def run(cbs):
        train, _ = loaders()
        t = Trainer(make_model(), train, None, AccTask(), cfg(max_steps=4), callbacks=cbs)
        t.fit()
        return [h["loss"] for h in train_logs(t.state)]

    base = run([])
    added = run([AddThree(), Spy()])
    assert all(s == pytest.approx(o + 3.0, abs=1e-5) for o, s in seen)  # chained in order
    # a constant does not change gradients, so training is identical and only the logged loss moves
    assert np.allclose(np.array(added) - np.array(base), 3.0, atol=1e-4)


def test_keep_best_restores_best_weights_and_buffers():
    class Sabotage(Callback):
        """Snapshot weights at the first (best) eval, then wreck weights and buffers every step.  Zeroed
        weights predict one class (45% of dev, below the first eval's 55%) whatever the RNG draws, so the
        first eval stays the best; random noise would let a later eval win by chance."""

        def __init__(self):
            self.best_snapshot = None
            self.wreck = False

        def on_evaluate(self, trainer, metrics):
            if trainer.state.best_step == trainer.state.step:
                self.best_snapshot = sd_copy(trainer.unwrapped_model)
                self.best_extra = trainer.unwrapped_model.np_mask.clone()
            self.wreck = True

        def on_step_end(self, trainer):
            if self.wreck:
                with torch.no_grad():
                    for p in trainer.unwrapped_model.parameters():
                        p.zero_()
                    trainer.unwrapped_model.p_mask.zero_()
                    trainer.unwrapped_model.np_mask.zero_()

    results = {}
    for keep_best in (True, False):
        model = make_model()
        model.register_buffer("p_mask", torch.ones(4))
        model.register_buffer("np_mask", torch.ones(4), persistent=False)
        train, evals = loaders()
        sab = Sabotage()
        t = Trainer(model, train, evals, AccTask(), cfg(epochs=2, eval_every=8, keep_best=keep_best),
                    callbacks=[sab])
        metrics = t.fit()
        evs = eval_logs(t.state)
        assert [e["step"] for e in evs] == [8, 16, 24, 32]
        assert all(e["accuracy"] < evs[0]["accuracy"] for e in evs[1:])  # the wreck makes the first eval the best
        best = max(evs, key=lambda e: e["accuracy"])
        assert t.state.best_step == best["step"] and t.state.best_metric == best["accuracy"]
        results[keep_best] = (model, sab, metrics, evs)

    model, sab, metrics, evs = results[True]
    assert same_weights(sd_copy(model), sab.best_snapshot)
    assert torch.equal(model.np_mask, sab.best_extra) and model.p_mask.sum() == 4
    best = max(evs, key=lambda e: e["accuracy"])
    assert metrics == {"accuracy": best["accuracy"]}
    model, sab, metrics, evs = results[False]
    assert not same_weights(sd_copy(model), sab.best_snapshot)
    assert metrics == {"accuracy": evs[-1]["accuracy"]}


def test_frozen_params_untouched_and_no_decay_groups():
    model = make_model()
    model.bert.embeddings.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.bert.embeddings.state_dict().items()}
    trainable_before = model.classifier.weight.detach().clone()
    train, _ = loaders()
    t = Trainer(model, train, None, AccTask(), cfg(max_steps=5, weight_decay=0.5))
    opt_params = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in opt_params for p in model.bert.embeddings.parameters())
    t.fit()
    assert all(torch.equal(v, frozen[k]) for k, v in model.bert.embeddings.state_dict().items())
    assert not torch.equal(model.classifier.weight, trainable_before)

    m = make_model()
    by_id = {id(p): n for n, p in m.named_parameters()}
    groups = default_param_groups(m, 0.1)
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {by_id[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "classifier.weight" in decayed and "bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert "classifier.bias" in plain and "bert.embeddings.LayerNorm.weight" in plain
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decayed)
    assert len(decayed) + len(plain) == len(by_id)


def test_custom_param_groups():
    model = make_model()

    def groups(m):
        return [{"params": [m.classifier.weight, m.classifier.bias], "lr": 1e-2, "weight_decay": 0.0}]

    train, _ = loaders()
    emb = model.bert.embeddings.word_embeddings.weight.detach().clone()
    t = Trainer(model, train, None, AccTask(), cfg(max_steps=2), param_groups=groups)
    t.fit()
    assert len(t.optimizer.param_groups) == 1 and t.optimizer.param_groups[0]["initial_lr"] == 1e-2
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, emb)


def test_regression_task():
    model = make_model(num_labels=1)
    train, evals = loaders(regression=True)
    preds, labels, logits = predict(model, evals["dev"], is_regression=True)
    assert preds.shape == labels.shape == (128,) and logits.shape == (128, 1) and labels.dtype == np.float32
    t = Trainer(model, train, evals, RegTask(), cfg(epochs=4, log_every=4, learning_rate=3e-3))
    metrics = t.fit()
    logs = train_logs(t.state)
    assert set(metrics) == {"pearson", "mse"}
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert metrics["pearson"] > 0.8 and metrics["mse"] < 0.2


def test_regression_trains_through_full_rank_factors():
    """A model whose every encoder Linear is replaced by exact full-rank factors computes the same function
    and learns a regression target as the dense model does: the path every factorized model is re-trained on."""
    from factorlm.factorize import budget_plan, factorize
    from factorlm.models.surgery import find_targets

    dense = make_model(num_labels=1)
    fact = copy.deepcopy(dense)
    targets = find_targets(fact)
    acc = factorize(fact, budget_plan(fact, targets, rank=32))  # 32 = min(out, in) of every target: exact
    assert len(targets) == 12 and acc.target_weights_after > acc.target_weights_before
    _, evals = loaders(regression=True)
    batch = next(iter(evals["dev"]))
    with torch.no_grad():
        torch.testing.assert_close(fact.eval()(**batch).logits, dense.eval()(**batch).logits, atol=1e-5, rtol=1e-4)
    scores = {}
    for name, model in (("dense", dense), ("factorized", fact)):
        train, evals = loaders(regression=True)
        scores[name] = Trainer(model, train, evals, RegTask(), cfg(epochs=4, learning_rate=3e-3)).fit()["pearson"]
    assert scores["dense"] > 0.8 and scores["factorized"] > 0.8, scores
    assert abs(scores["dense"] - scores["factorized"]) < 0.1, scores


def test_two_eval_splits_prefixed():
    class MnliTask(AccTask):
        eval_splits = ("dev_matched", "dev_mismatched")

    model = make_model()
    train, evals = loaders(splits=("dev_mismatched", "dev_matched"))
    m = evaluate(model, evals, MnliTask())
    assert list(m) == ["matched_accuracy", "mismatched_accuracy"]  # task order, split prefix stripped
    t = Trainer(model, train, evals, MnliTask(), cfg(max_steps=4, eval_every=2))
    metrics = t.fit()
    assert set(metrics) == {"matched_accuracy", "mismatched_accuracy"}
    ev = eval_logs(t.state)[-1]
    assert t.state.best_metric == pytest.approx(max(
        (e["matched_accuracy"] + e["mismatched_accuracy"]) / 2 for e in eval_logs(t.state)))
    assert "matched_accuracy" in ev

    class Prefixed(MnliTask):
        main_metric = "mismatched_accuracy"

    t = Trainer(make_model(), *loaders(splits=("dev_matched", "dev_mismatched")), Prefixed(), cfg(max_steps=2))
    t.fit()
    assert t.state.best_metric == eval_logs(t.state)[-1]["mismatched_accuracy"]


def test_predict_and_evaluate_restore_mode():
    model = make_model()
    _, evals = loaders()
    model.train()
    preds, labels, logits = predict(model, evals["dev"])
    assert model.training
    assert preds.shape == labels.shape == (128,) and logits.shape == (128, 2)
    assert np.array_equal(preds, logits.argmax(-1))
    model.eval()
    evaluate(model, evals, AccTask())
    assert not model.training
    assert evaluate(model, {}, AccTask()) == {}


def test_distillation_identical_teacher_adds_zero():
    seen = []

    class Spy(Callback):
        def compute_loss(self, trainer, batch, outputs, loss):
            seen.append((float(outputs.loss.detach()), float(loss.detach())))
            return loss

    student = make_model(dropout=0.0)
    teacher = copy.deepcopy(student)
    kd = DistillationCallback(teacher, alpha=1.0, temperature=2.0)
    train, _ = loaders()
    t = Trainer(student, train, None, AccTask(), cfg(max_steps=3), callbacks=[kd, Spy()])
    t.fit()
    assert seen[0][1] == pytest.approx(seen[0][0], abs=1e-6)  # KL(teacher || identical student) = 0
    assert float(kd.last_kd) > 0  # the student moved away from the teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).device == t.accelerator.device

    # a different teacher adds a positive term; with scale_task_loss the task loss is weighted by 1 - alpha
    seen.clear()
    other = make_model(seed=1, dropout=0.0)
    with torch.no_grad():
        other.classifier.bias.copy_(torch.tensor([4.0, -4.0]))  # confident teacher: clearly non-zero KL
    kd = DistillationCallback(other, alpha=0.5, temperature=2.0, scale_task_loss=True)
    t = Trainer(make_model(dropout=0.0), loaders()[0], None, AccTask(), cfg(max_steps=1), callbacks=[kd, Spy()])
    t.fit()
    task, total = seen[0]
    assert float(kd.last_kd) > 0.5
    assert total == pytest.approx(0.5 * task + 0.5 * float(kd.last_kd), rel=1e-5)

    with pytest.raises(FactorLMError):
        DistillationCallback(other, alpha=2.0, scale_task_loss=True)


def test_distillation_loss_values():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    tl = torch.tensor([[2.0, 0.0, 0.5], [1.0, 1.0, 1.0]])
    T = 2.0
    p_t = torch.softmax(tl / T, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert distillation_loss(s, tl, T) == pytest.approx(float(manual), rel=1e-5)
    assert distillation_loss(s, s, T) == pytest.approx(0.0, abs=1e-6)
    reg = distillation_loss(s[:, :1], tl[:, :1], regression=True)
    assert reg == pytest.approx(float(((s[:, 0] - tl[:, 0]) ** 2).mean()))


def test_config_validation_and_checkpoint(tmp_path):
    with pytest.raises(FactorLMError):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(FactorLMError):
        TrainConfig(save_every=5)
    c = TrainConfig(max_steps=7)
    assert TrainConfig(**c.to_dict()) == c and json.dumps(c.to_dict())

    class WithState(Callback):
        def state_dict(self):
            return {"scores": [1, 2]}

    train, _ = loaders(n_train=32)
    t = Trainer(make_model(), train, None, AccTask(),
                cfg(max_steps=2, save_every=2, checkpoint_dir=str(tmp_path)), callbacks=[WithState()])
    t.fit()
    ck = tmp_path / "step-2"
    assert (ck / "trainer_state.json").exists()
    assert json.loads((ck / "trainer_state.json").read_text())["state"]["step"] == 2
    assert torch.load(ck / "callbacks.pt") == [{"scores": [1, 2]}]


def test_empty_training_data_is_a_user_error():
    with pytest.raises(FactorLMError):
        Trainer(make_model(), DataLoader([], batch_size=4), None, AccTask(), cfg())


def test_shared_accelerator_releases_every_phase():
    """Phases share one Accelerator (a session's): each Trainer must release what it prepared, or
    wrapped models / optimizers pile up with phases and stages."""
    import gc
    import weakref

    from accelerate import Accelerator

    acc = Accelerator()
    model = make_model()
    refs = []
    for _ in range(3):
        train, evals = loaders(n_train=32)
        t = Trainer(model, train, evals, AccTask(), cfg(max_steps=2), accelerator=acc)
        assert len(acc._models) == 1 and len(acc._optimizers) == 1 and len(acc._schedulers) == 1
        t.fit()
        refs.append(weakref.ref(t.optimizer.optimizer))
        t.close()
        assert acc._models == [] and acc._optimizers == [] and acc._schedulers == [] and acc._dataloaders == []
        assert t.unwrapped_model is model
        del t
        gc.collect()
        assert all(r() is None for r in refs)  # no optimizer (and its Adam state) survives its phase


def test_gradient_hooks_see_unscaled_gradients_under_fp16_loss_scaling():
    """on_after_backward must read dL/dW, not scale * dL/dW (PLATON, RankDyna read gradients there)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the process-wide state was made without fp16
    acc = Accelerator(mixed_precision="fp16")  # on CPU accelerate makes no scaler: inject one
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    model = make_model(dropout=0.0)
    train, _ = loaders(n_train=16, bs=16)
    batch = next(iter(train))
    ref = copy.deepcopy(model).train()
    ref(**batch).loss.backward()
    g_ref = ref.classifier.weight.grad.clone()
    seen = []

    class Rec(Callback):
        def on_after_backward(self, trainer):
            seen.append(trainer.unwrapped_model.classifier.weight.grad.clone())

    t = Trainer(model, DataLoader([{k: v[i] for k, v in batch.items()} for i in range(16)], batch_size=16),
                None, AccTask(), cfg(max_steps=1, max_grad_norm=1.0), callbacks=[Rec()], accelerator=acc)
    try:
        t.fit()
    finally:
        t.close()
        AcceleratorState._reset_state(True)
    assert len(seen) == 1
    ratio = float(seen[0].norm() / g_ref.norm())
    assert ratio == pytest.approx(1.0, rel=1e-3)  # 4096 without unscaling


def test_accelerators_with_different_mixed_precision_in_one_process():
    """accelerate refuses a second Accelerator whose mixed precision differs from the first one's; a
    benchmark (or CI) that fine-tunes in fp32 and then in bf16 in one process must still get bf16."""
    from factorlm.train.loop import make_accelerator

    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"
    t = Trainer(make_model(), loaders(n_train=16)[0], None, AccTask(), cfg(max_steps=1, mixed_precision="bf16"))
    try:
        assert t.accelerator.mixed_precision == "bf16"
    finally:
        t.close()


def test_teacher_logits_cached_by_example_index_give_the_same_training():
    """With ``example_index`` in the batches the teacher runs once per example (the first epoch) and
    later epochs read its cached logits; training is the same as with the teacher run every step. The
    Trainer does not pass ``example_index`` to the model (BERT's forward would raise on it)."""
    def indexed(n):
        return [dict(x, example_index=i) for i, x in enumerate(make_data(n, 0))]

    teacher = make_model(seed=1, dropout=0.0)
    with torch.no_grad():
        teacher.classifier.bias.copy_(torch.tensor([2.0, -2.0]))
    runs = {}
    for cache in (True, False):
        student = make_model(dropout=0.1)
        kd = DistillationCallback(copy.deepcopy(teacher), alpha=1.0, cache_logits=cache)
        t = Trainer(student, DataLoader(indexed(64), batch_size=16, shuffle=True), None, AccTask(),
                    cfg(max_steps=12), callbacks=[kd])  # 3 epochs of 4 batches
        t.fit()
        t.close()
        runs[cache] = (kd, student.state_dict())
    (kd_c, w_c), (kd_n, w_n) = runs[True], runs[False]
    assert (kd_c.teacher_examples, kd_c.cached_examples) == (64, 128)
    assert (kd_n.teacher_examples, kd_n.cached_examples) == (192, 0)
    assert kd_c._logits is None  # released at the end of the phase
    for k in w_c:
        torch.testing.assert_close(w_c[k], w_n[k], rtol=0, atol=1e-6)

    # without indices (or for token-level heads) nothing is cached
    kd = DistillationCallback(copy.deepcopy(teacher))
    Trainer(make_model(), loaders(n_train=32)[0], None, AccTask(), cfg(max_steps=4), callbacks=[kd]).fit()
    assert (kd.teacher_examples, kd.cached_examples) == (64, 0)


def test_sessions_in_two_precisions_each_train_in_their_own():
    """accelerate's precision state is process-wide: a session made in bf16 must still train in bf16
    after a session in fp32 reset that state (a notebook that compares the two)."""
    from factorlm import RunConfig
    from factorlm.session import Session

    a = Session(RunConfig(task="rotten_tomatoes", mixed_precision="bf16"), quiet=True)
    assert a.accelerator.mixed_precision == "bf16"
    b = Session(RunConfig(task="rotten_tomatoes", mixed_precision="no"), quiet=True)
    assert b.accelerator.mixed_precision == "no"
    acc = a.accelerator
    assert acc.mixed_precision == "bf16" and acc is a.accelerator  # made again once, then kept
    assert b.accelerator.mixed_precision == "no"


def test_teacher_cache_runs_the_teacher_only_on_rows_not_seen():
    """A batch partly cached (several processes reshuffle their shards every epoch) runs the teacher on
    its new rows only, and every row equals the teacher's own logits for that example."""
    data = [dict(x, example_index=i) for i, x in enumerate(make_data(48, 0))]
    teacher = make_model(seed=1, dropout=0.0).eval()
    kd = DistillationCallback(copy.deepcopy(teacher))
    t = Trainer(make_model(), DataLoader(data, batch_size=16), None, AccTask(), cfg(max_steps=1), callbacks=[kd])
    kd.on_train_begin(t)
    collate = torch.utils.data.default_collate
    first, second = collate(data[40:48]), collate(data[4:8] + data[44:48] + data[0:4])
    kd._teacher_heads(t, first)
    got = kd._teacher_heads(t, second)["logits"]
    assert (kd.teacher_examples, kd.cached_examples) == (8 + 8, 4)
    with torch.no_grad():
        want = teacher(input_ids=second["input_ids"], attention_mask=second["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert kd._logits.shape[0] >= 48 and int(kd._seen.sum()) == 16
    kd.on_train_end(t)
    t.close()


def test_mixed_precision_auto_is_resolved_and_recorded(monkeypatch):
    """``auto`` becomes bf16 only where bf16 is native (emulated bf16 is slower than fp32), and the
    recipe records the precision that ran, not "auto"."""
    import factorlm.profiling as prof
    from factorlm import RunConfig

    monkeypatch.setattr(prof, "bf16_native", lambda device="cpu": True)
    c = RunConfig(mixed_precision="auto")
    assert c.mixed_precision == "bf16" and c.to_dict()["mixed_precision"] == "bf16"
    monkeypatch.setattr(prof, "bf16_native", lambda device="cpu": False)
    assert RunConfig(mixed_precision="auto").mixed_precision == "no"
    with pytest.raises(FactorLMError, match="--mixed-precision must be"):
        RunConfig(mixed_precision="bf17").validate()
