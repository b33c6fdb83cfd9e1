import torch, time
from safetensors.torch import load_file
from factorlm.decompose.weighted_svd import sparsity_aware_svd, weighted_error
torch.set_num_threads(1)
d = "/work/main/benchmarks/results/cache/pruned/mrpc-k0.25-s0-full-kd"
st = load_file(d + "/pruning.safetensors"); w = load_file(d + "/model.safetensors")
name = "bert.encoder.layer.0.attention.self.query"
W, m, s = w[name + ".weight"], st["mask/" + name], st["score/" + name]
outs = []
for run in range(3):
    t0 = time.time()
    A, B = sparsity_aware_svd(W.clone(), 64, mask=m, scores=s, decomposition="em", omega="scores", solver="als")
    outs.append(A @ B); print(run, "s %.1f" % (time.time() - t0), "rel fro err vs W %.4f" % float((W - A @ B).norm() / W.norm()))
print("max diff run0-run1", float((outs[0] - outs[1]).abs().max()), "run0-run2", float((outs[0] - outs[2]).abs().max()))
A, B = sparsity_aware_svd(W.clone().double(), 64, mask=m, scores=s.double(), decomposition="em", omega="scores", solver="als")
print("fp64 rel err %.4f" % float((W.double() - A @ B).norm() / W.norm()), "diff vs fp32 run0", float((outs[0].double() - A @ B).abs().max()))
U, S, Vh = torch.linalg.svd(W, full_matrices=False)
print("plain rank-64 SVD rel err %.4f" % float((W - (U[:, :64] * S[:64]) @ Vh[:64]).norm() / W.norm()))
print("score range in this matrix: min %.1e max %.1e" % (float(s.min()), float(s.max())))
