"""Share of PyTorch's fused attention (scaled_dot_product_attention) in a ViT training step.

    python benchmarks/vit_attention_share.py

vit_tiny, batch 64, 32 px, fp32, one thread, SGD: the step time (mean of 5 after 3 warm-ups) and
the self CPU time of the attention kernels (forward and backward) over all ops of 3 profiled
steps, with the 8 most expensive ops.
"""

import time

import torch
from torch.profiler import ProfilerActivity, profile

from kdlab.models import create_model

torch.set_num_threads(1)
torch.manual_seed(0)
m = create_model("vit_tiny", num_classes=100)
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x = torch.randn(64, 3, 32, 32)
y = torch.randint(0, 100, (64,))
def step() -> None:
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(m(x).logits, y)
    loss.backward()
    opt.step()
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(5):
    step()
print("step ms", (time.perf_counter() - t) / 5 * 1000)
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(3):
        step()
tot = sum(e.self_cpu_time_total for e in p.key_averages())
att = sum(e.self_cpu_time_total for e in p.key_averages() if "attention" in e.key.lower())
print(f"attention share {100 * att / tot:.1f}%")
for e in sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
    print(e.key, round(e.self_cpu_time_total / 1000 / 3, 1), "ms/step")
