"""Quickstart: autosp reproduces single-process loss, gradients and logits.

Run with:  torchrun --nproc-per-node 2 examples/quickstart.py
"""

import copy
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import autosp

cuda = torch.cuda.is_available()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
dist.init_process_group("nccl" if cuda else "gloo")
rank = dist.get_rank()

torch.manual_seed(0)  # the same weights and the same batch on every rank
config = LlamaConfig(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,  # grouped-query attention
    attn_implementation="sdpa", use_cache=False,
)  # fmt: skip
model = LlamaForCausalLM(config).to(device)
ids = torch.randint(0, config.vocab_size, (1, 1024), device=device)

if rank == 0:  # single-process reference on a copy, before parallelize
    ref_model = copy.deepcopy(model)
    ref = ref_model(input_ids=ids, labels=ids)
    ref.loss.backward()

params = dict(model.named_parameters())
# return_logits=True: compare the logits too (by default a step that computes its loss from
# the logits returns None for them; they are never built whole, see the README's Loss section).
model = autosp.parallelize(model, backend="inductor", return_logits=True)
out = model(input_ids=ids, labels=ids)  # every rank passes the full batch
out.loss.backward()  # gradients come back summed over the SP group
logits = autosp.gather_sequence(out.logits)  # each rank holds a sequence shard of the logits

if rank == 0:
    loss_err = abs(out.loss.item() - ref.loss.item()) / abs(ref.loss.item())
    grad_err = max(
        ((params[name].grad - p.grad).norm() / p.grad.norm()).item()
        for name, p in ref_model.named_parameters()
    )
    logits_diff = (logits - ref.logits).abs().max().item()
    print(f"loss {out.loss.item():.6f} (reference {ref.loss.item():.6f}), rel. err {loss_err:.1e}")
    print(f"max per-tensor gradient rel. error {grad_err:.1e}")
    print(
        f"logits {tuple(out.logits.shape)} per rank, gathered {tuple(logits.shape)} "
        f"(reference {tuple(ref.logits.shape)}), max abs diff {logits_diff:.1e}"
    )
dist.destroy_process_group()
