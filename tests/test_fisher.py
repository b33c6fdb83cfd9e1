"""accumulate_fisher (per-example and batch estimates) and FWSVD's Fisher lifecycle (one-shot / staged)."""

import copy
import types

import pytest
import torch

from conftest import tiny_bert
from factorlm.config import RunConfig
from factorlm.errors import FactorLMError
from factorlm.methods import get_method
from factorlm.models import find_targets
from factorlm.staged import DecomposeFactory, run_factorize
from factorlm.train import fisher as fisher_mod
from factorlm.train.fisher import accumulate_fisher

pytestmark = pytest.mark.usefixtures("one_thread")

# beyond the encoder: the pooler and the classifier take 2-D (batch, features) inputs
EXTRA = ["bert.pooler.dense", "classifier"]


def _batches(regression=False, n=10, T=12, split=(4, 6), seed=1):
    """Batches with padding of different lengths within each batch (example 0 of each is unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, T), generator=g)
    lens = torch.randint(3, T, (n,), generator=g)
    lens[0] = lens[split[0]] = T
    mask = (torch.arange(T)[None, :] < lens[:, None]).long()
    ids = ids * mask  # pad id 0
    labels = torch.randn(n, generator=g) if regression else torch.randint(0, 2, (n,), generator=g)
    out, a = [], 0
    for b in split:
        out.append({"input_ids": ids[a:a + b], "attention_mask": mask[a:a + b], "labels": labels[a:a + b]})
        a += b
    return out


def _brute(model, batches, names, per_example):
    """Sum of squared gradients, one backward per example (each run alone and *unpadded*) or per batch
    (of its mean loss)."""
    model = copy.deepcopy(model).eval()
    ws = [model.get_submodule(n).weight for n in names]
    for w in ws:
        w.requires_grad_(True)
    ref = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in zip(names, ws)}

    def add(loss):
        for n, g in zip(names, torch.autograd.grad(loss, ws)):
            ref[n] += g.double() ** 2

    for b in batches:
        if not per_example:
            add(model(**b).loss)
            continue
        for i in range(b["input_ids"].shape[0]):
            L = int(b["attention_mask"][i].sum())
            add(model(input_ids=b["input_ids"][i:i + 1, :L], attention_mask=b["attention_mask"][i:i + 1, :L],
                      labels=b["labels"][i:i + 1]).loss)
    return ref


def _brute_per_example(model, batches, names):
    return _brute(model, batches, names, per_example=True)


def _brute_batch(model, batches, names):
    return _brute(model, batches, names, per_example=False)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("regression", [False, True])
def test_per_example_matches_one_backward_per_example(regression):
    model = tiny_bert(num_labels=1 if regression else 2)
    names = find_targets(model) + EXTRA
    batches = _batches(regression)
    F = accumulate_fisher(model, batches, names, progress=False)
    ref = _brute_per_example(model, batches, names)
    for n in names:
        assert F[n].shape == model.get_submodule(n).weight.shape and F[n].dtype == torch.float32
        assert ref[n].norm() > 0
        assert _rel(F[n], ref[n]) < 1e-5, n


def test_per_example_chunked_and_max_batches():
    model = tiny_bert()
    names = find_targets(model)[:3] + EXTRA
    batches = _batches()
    full = accumulate_fisher(model, batches, names, progress=False)
    chunked = accumulate_fisher(model, batches, names, progress=False, chunk_elements=1)  # one example at a time
    for n in names:
        assert _rel(chunked[n], full[n]) < 1e-6
    first = accumulate_fisher(model, batches, names, progress=False, max_batches=1)
    ref = _brute_per_example(model, batches[:1], names)
    for n in names:
        assert _rel(first[n], ref[n]) < 1e-5


def test_batch_mode_matches_squared_batch_mean_gradients_and_differs_from_per_example():
    model = tiny_bert()
    names = find_targets(model) + EXTRA
    batches = _batches()
    Fb = accumulate_fisher(model, batches, names, per_example=False, progress=False)
    Fp = accumulate_fisher(model, batches, names, per_example=True, progress=False)
    ref = _brute_batch(model, batches, names)
    for n in names:
        assert _rel(Fb[n], ref[n]) < 1e-5, n
        assert _rel(Fb[n], Fp[n]) > 0.1, n  # a different quantity, not a rescaling of the same one
    # squares of sums are at most n times the sums of squares (Cauchy-Schwarz): batch-mean is smaller
    assert sum(Fb[n].sum() for n in names) < sum(Fp[n].sum() for n in names)


def test_state_is_restored_and_dropout_is_off():
    model = tiny_bert().train()  # dropout 0.1 active in train mode
    names = find_targets(model)[:4]
    model.classifier.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches()
    F1 = accumulate_fisher(model, batches, names, progress=False)
    F2 = accumulate_fisher(model, batches, names, progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    ref = _brute_per_example(model, batches, names)  # eval mode
    for n in names:
        assert torch.equal(F1[n], F2[n])  # deterministic: no dropout
        assert _rel(F1[n], ref[n]) < 1e-5
    assert not any(m._forward_hooks for m in model.modules())


def test_errors_are_one_line():
    model = tiny_bert()
    b = _batches()[0]
    with pytest.raises(FactorLMError, match="no loss"):
        accumulate_fisher(model, [{k: v for k, v in b.items() if k != "labels"}], ["classifier"], progress=False)
    with pytest.raises(FactorLMError, match="--fisher must be one of"):
        get_method("fwsvd", {"fisher": "exact"})
    with pytest.raises(FactorLMError, match="--fisher-batches"):
        get_method("fwsvd", {"fisher_batches": 0})
    assert get_method("fwsvd").options.fisher == "per_example"


# -- FWSVD lifecycle: once one-shot, per stage staged -------------------------------------------------


class FakeSession:
    """Enough of a Session for SVDMethod.run; 'training' perturbs every weight."""

    def __init__(self, **cfg):
        self.config = RunConfig(keep=0.5, epochs=1.0, progress=False, **cfg)
        self.accelerator = types.SimpleNamespace(device=torch.device("cpu"))
        self.quiet = True
        self.phases = []
        self.after = {}  # phase -> the model as that phase's training left it
        self._batches = _batches()

    def log(self, msg):
        pass

    def train_loader(self):
        return self._batches

    def evaluate(self, model, phase=None, check=True):
        return {}

    def finetune(self, model, phase, epochs=None, **kw):
        self.phases.append(phase)
        g = torch.Generator().manual_seed(len(self.phases))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
        self.after[phase] = copy.deepcopy(model)
        return {}


@pytest.fixture
def fisher_calls(monkeypatch):
    calls = []
    real = fisher_mod.accumulate_fisher

    def counting(model, loader, names, **kw):
        out = real(model, loader, names, **kw)
        calls.append((list(names), out))
        return out

    monkeypatch.setattr(fisher_mod, "accumulate_fisher", counting)
    return calls


@pytest.mark.parametrize("policy", ["uniform", "global"])
def test_fwsvd_one_shot_computes_the_fisher_once(fisher_calls, policy):
    model = tiny_bert()
    s = FakeSession(rank_policy=policy)
    get_method("fwsvd", {"fisher_batches": 2, "finetune": False}).run(s, model)
    assert len(fisher_calls) == 1 and fisher_calls[0][0] == find_targets(tiny_bert())


@pytest.mark.parametrize("policy", ["uniform", "global"])
def test_fwsvd_staged_recomputes_the_fisher_per_stage(fisher_calls, policy):
    teacher = tiny_bert()
    model = copy.deepcopy(teacher)
    targets = find_targets(teacher)
    s = FakeSession(rank_policy=policy, schedule="staged", stages=2)
    get_method("fwsvd", {"fisher_batches": 2, "finetune": False}).run(s, model)
    stage1, stage2 = targets[:6], targets[6:]
    assert [c[0] for c in fisher_calls] == ([targets] if policy == "global" else [stage1]) + [stage2]
    F2 = fisher_calls[-1][1]
    # stage 2's Fisher is the one of the model that stage 1's training left, not the teacher's
    on_teacher = accumulate_fisher(teacher, s._batches, stage2, max_batches=2, progress=False)
    on_current = accumulate_fisher(s.after["stage1"], s._batches, stage2, max_batches=2, progress=False)
    for n in stage2:
        assert _rel(F2[n], on_current[n]) < 1e-6
        assert _rel(F2[n], on_teacher[n]) > 0.05


def test_decompose_factory_and_fixed_forms_in_run_factorize(tiny_model):
    """A factory is called per stage with that stage's names (lifted by the structure); a mapping
    or plain callable is used as given."""
    from factorlm.decompose import truncated_svd
    from factorlm.layers import LowRankLinear

    targets = find_targets(tiny_model)
    plan = {n: {"rank": 4} for n in targets}
    seen = []

    def make(model, names):
        seen.append(list(names))
        assert all(not isinstance(model.get_submodule(n), LowRankLinear) for n in names)
        return {n: truncated_svd for n in names}

    s = FakeSession(schedule="staged", stages=2)
    run_factorize(s, tiny_model, plan, "lowrank", DecomposeFactory(make))
    assert seen == [targets[:6], targets[6:]]
    assert all(isinstance(tiny_model.get_submodule(n), LowRankLinear) for n in targets)

    m2, used = tiny_bert(), []

    def fixed(W, rank, **kw):
        used.append(W.shape)
        return truncated_svd(W, rank)

    run_factorize(FakeSession(), m2, plan, "lowrank", {n: fixed for n in targets})
    run_factorize(FakeSession(schedule="staged", stages=2), tiny_bert(), plan, "lowrank", fixed)
    assert len(used) == 2 * len(targets)
