"""Influence over LoRA adapters only (peft): which training examples helped a query, with EK-FAC and DataInf.

A small classifier is "pre-trained" on one rule, then adapted with LoRA (r=4 on both Linear layers) to a new
rule on 200 training examples, 10 of which have flipped labels. ``ifunc.params_of(peft_model)`` returns only
the trainable LoRA A/B matrices, so influence is computed over the adapter (the frozen base is untouched).
Run: ``python examples/lora_influence.py`` (a few seconds on a CPU; needs ``pip install peft``).
"""

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import ifunc

torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
n, d = 200, 8
x = torch.randn(n, d, generator=gen)
y = (x[:, 0] + x[:, 1] > 0).long()  # the adaptation task
flipped = torch.arange(10) * 20  # ten mislabelled training examples
y[flipped] = 1 - y[flipped]

base = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
opt = torch.optim.Adam(base.parameters(), lr=1e-2)
for _ in range(200):  # "pre-training" on a different rule
    opt.zero_grad()
    F.cross_entropy(base(x), (x[:, 0] > 0).long()).backward()
    opt.step()

model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=0.0))
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for _ in range(300):  # LoRA fine-tuning on the new rule
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
model.eval()

params = ifunc.params_of(model)  # trainable only: the LoRA A/B matrices
print(f"influence over {len(params)} LoRA matrices, {sum(p.numel() for p in params.values())} parameters")
loss = ifunc.output_loss(
    lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
)
train = (x, y)
xq = torch.tensor([[1.5, 1.0] + [0.0] * (d - 2)])
query = (xq, torch.tensor([1]))

ekfac = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.1)
datainf = ifunc.ihvp_datainf(loss, params, train, damping=0.1)
flip = set(flipped.tolist())
show = lambda idx: ", ".join(f"{i}{'*' if i in flip else ''}" for i in idx)
print(f"query x = {xq[0, :2].tolist()}..., label 1; top 3 training examples (* = flipped label):")
for name, ihvp in (("EK-FAC", ekfac), ("DataInf", datainf)):
    scores = ifunc.attribute(loss, params, ihvp, train, query)[0]  # positive = helpful for the query
    helpful, harmful = scores.topk(3).indices.tolist(), (-scores).topk(3).indices.tolist()
    print(f"{name:>8}: most helpful {show(helpful)}; most harmful {show(harmful)}")

self_inf = ifunc.self_influence(loss, params, ekfac, train)
found = set(self_inf.topk(10).indices.tolist()) & flip
print(f"self-influence (EK-FAC) puts {len(found)} of the 10 flipped labels in its top 10")
