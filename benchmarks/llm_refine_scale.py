"""Issue 31 item 1c at real width: peak memory and time of one refinement of a Llama-3-8B-shaped block
(H 4096, I 14336, GQA 32/8; random factors at keep 0.8, fp32, one thread).

    python benchmarks/llm_refine_scale.py [SEQ]     # default 128 tokens per batch, 2 batches, 2 steps
"""
import sys, time, resource, torch, transformers
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
torch.set_num_threads(1); torch.manual_seed(0)
from factorlm.layers.lowrank import LowRankLinear
from factorlm.lm.refine import RefineSpec, refine_block
cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=1)
block = transformers.models.llama.modeling_llama.LlamaDecoderLayer(cfg, 0).eval()
rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
for n in names:  # keep 0.8 of each matrix's weights as random factors (the shapes are what matters here)
    lin = block.get_submodule(n); o, i = lin.weight.shape; k = int(0.8 * o * i / (o + i))
    parent, leaf = n.rsplit(".", 1)
    setattr(block.get_submodule(parent), leaf, LowRankLinear.from_factors(torch.randn(o, k) * 0.01, torch.randn(k, i) * 0.01, None))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
class Call:
    def __init__(self, h, pe): self.h, self.pe = h, pe
    def __call__(self, b):
        out = b(self.h, position_embeddings=self.pe, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out
seq = int(sys.argv[1]) if len(sys.argv) > 1 else 128
pos = torch.arange(seq)[None]
calls = [Call(torch.randn(1, seq, 4096), rot(torch.randn(1, seq, 4096), pos)) for _ in range(2)]
targets = [torch.randn(1, seq, 4096) for _ in range(2)]
params = sum(p.numel() for p in block.parameters())
t0 = time.perf_counter()
r = refine_block(block, names, calls, targets, RefineSpec(steps=2, lr=1e-3))
print(f"block params {params/1e6:.0f}M fp32, seq {seq}: 2 steps + guard {time.perf_counter()-t0:.1f}s, "
      f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20:.2f} GiB (after building the block {base/2**20:.2f} GiB)", r)
