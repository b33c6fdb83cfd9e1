
import torch

from factorlm.config import RunConfig
from factorlm.layers import LowRankLinear, MonarchLinear  # noqa: F401 (registers monarch)
from factorlm.models import find_targets
from factorlm.staged import layer_index, stage_groups, staged_factorize


def test_stage_groups_orders_and_sizes():
    names = [f"enc.layer.{i}.{m}" for i in range(4) for m in ("q", "ffn")] + ["head"]
    assert layer_index("bert.encoder.layer.11.attention.self.query") == 11
    g = stage_groups(names)
    assert [len(x) for x in g] == [2, 2, 2, 2, 1] and g[0] == ["enc.layer.0.q", "enc.layer.0.ffn"]
    td = stage_groups(names, order="top_down")
    assert td[0] == ["enc.layer.3.q", "enc.layer.3.ffn"]
    two = stage_groups(names, stages=2)
    assert [layer_index(n) for n in two[0]] == [0, 0, 1, 1] and len(two) == 3
    assert sorted(sum(stage_groups(names, stages=3), [])) == sorted(names)


class FakeSession:
    """Records the order of factorize / train calls."""

    def __init__(self, **cfg):
        self.config = RunConfig(schedule="staged", **cfg)
        self.events = []

    def log(self, msg):
        pass

    def finetune(self, model, phase, epochs=None, **kw):
        n_fact = sum(isinstance(m, (LowRankLinear, MonarchLinear)) for m in model.modules())
        self.events.append((phase, n_fact, epochs))
        return {}


def test_staged_factorize_trains_between_stages(tiny_model):
    targets = find_targets(tiny_model)
    plan = {n: {"rank": 4} for n in targets}
    s = FakeSession(stages=0, epochs=2.0)
    acc = staged_factorize(s, tiny_model, plan, "lowrank")
    assert [e[0] for e in s.events] == ["stage1", "stage2"]
    assert [e[1] for e in s.events] == [6, 12]  # 6 matrices per layer, factorized cumulatively
    assert s.events[0][2] == 1.0  # epochs split over stages
    assert acc.target_weights_after == sum(4 * (o + i) for o, i in
                                           [(32, 32)] * 8 + [(64, 32), (32, 64)] * 2)


def test_staged_with_monarch(tiny_model):
    targets = find_targets(tiny_model)
    plan = {n: {"block_rank": 2, "nblocks": 4} for n in targets}
    s = FakeSession(stage_order="top_down")
    staged_factorize(s, tiny_model, plan, "monarch")
    assert isinstance(tiny_model.get_submodule(targets[-1]), MonarchLinear)
    assert tiny_model(input_ids=torch.randint(0, 100, (1, 5))).logits.shape == (1, 2)


def test_staged_svd_distils_in_every_fine_tune(tiny_model):
    """Equal distillation: --finetune-distill reaches the fine-tune after every stage, not only the last
    (a one-shot SVD_Ft_KD distils over all its steps; the staged one must too), and the teacher is the
    dense model copied before any stage factorized."""
    from factorlm.methods import get_method
    from factorlm.train import DistillationCallback

    class Session(FakeSession):
        def evaluate(self, model, phase, check=True):
            return {}

        def finetune(self, model, phase, epochs=None, callbacks=(), **kw):
            super().finetune(model, phase, epochs)
            kd = [cb for cb in callbacks if isinstance(cb, DistillationCallback)]
            self.events[-1] += (kd[0].teacher if kd else None,)
            return {}

    dense = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    s = Session(stages=0, epochs=1.0, keep=0.5, method="svd")
    get_method("svd", {"finetune_distill": 1.0}).run(s, tiny_model)
    assert [e[0] for e in s.events] == ["stage1", "stage2", "finetune"]
    teachers = [e[3] for e in s.events]
    assert all(t is not None for t in teachers) and len({id(t) for t in teachers}) == 1
    assert all(torch.equal(v, dense[k]) for k, v in teachers[0].state_dict().items())
    assert not any(isinstance(m, LowRankLinear) for m in teachers[0].modules())
