"""Sharded parameters gathered in autosp's graph (ZeRO-3 / per-layer FSDP memory): parameters
sharded over dp 2 x sp 2 = 4 ranks, each sequence split over 2.

Run with:  torchrun --nproc-per-node 4 examples/sharded.py

Trains a tiny random-init Llama for a few clipped AdamW steps, each data-parallel group on its
own sequences (``data_parallel_sampler``), then checks on rank 0 that the parameters equal those
of one process trained on the concatenated batches.
"""

import copy

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from autosp.integrations import sharded
from autosp.mesh import data_parallel_sampler, sequence_parallel_mesh

STEPS, SEQ, CLIP = 4, 256, 1.0
dist.init_process_group("gloo")  # CPU; "nccl" and device_type="cuda" on GPUs
mesh = sequence_parallel_mesh(2)  # ("dp", "sp") = (world / 2, 2)

torch.manual_seed(0)  # the same weights on every rank
config = LlamaConfig(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", use_cache=False,
)  # fmt: skip
model = LlamaForCausalLM(config)
reference = copy.deepcopy(model) if dist.get_rank() == 0 else None

data = TensorDataset(torch.randint(0, config.vocab_size, (STEPS * mesh["dp"].size(), SEQ)))
loader = DataLoader(data, batch_size=1, sampler=data_parallel_sampler(data, mesh, shuffle=False))

# One call: every parameter becomes this rank's 1/4 of its rows; the compiled graph gathers
# each at its use and again in the backward, whose reduce-scatter leaves each rank its rows of
# the exact gradient. backend="aot_eager" compiles fast on CPU; leave it out (Inductor) on GPUs.
model = sharded.shard(model, mesh, backend="aot_eager")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # after shard(): the shards
for step, (ids,) in enumerate(loader):
    loss = model(input_ids=ids, labels=ids).loss  # the same sequence on both SP ranks
    loss.backward()
    norm = sharded.clip_grad_norm_(model, CLIP)  # the global norm, over every rank's shards
    optimizer.step()
    optimizer.zero_grad()
    if dist.get_rank() == 0:
        print(f"step {step}: loss {loss.item():.4f} (data-parallel group 0), grad norm {norm:.3f}")

state = sharded.full_state_dict(model)  # the plain model's keys, whole tensors (a collective)
if reference is not None:  # one process, the concatenated batches, the same optimizer
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for step in range(STEPS):
        ids = data.tensors[0][step * mesh["dp"].size() : (step + 1) * mesh["dp"].size()]
        reference(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        ref_opt.step()
        ref_opt.zero_grad()
    err = max(((state[n] - p).norm() / p.norm()).item() for n, p in reference.named_parameters())
    print(f"after {STEPS} steps: max per-tensor parameter rel. error vs one process {err:.1e}")
dist.destroy_process_group()
