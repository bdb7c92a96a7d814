"""DeepSpeed ZeRO x autosp: ZeRO-2 over dp 2 x sp 2 = 4 ranks, each sequence split over 2.

Run with:  DS_ACCELERATOR=cpu torchrun --nproc-per-node 4 examples/deepspeed_zero.py
           (on GPUs drop DS_ACCELERATOR; set "stage" to 1 or 2 in deepspeed_zero.json)

The config's "autosp" section sets the sequence-parallel degree (and autosp options);
``autosp.integrations.deepspeed.initialize`` takes it out, parallelizes the model and calls
``deepspeed.initialize`` so that ZeRO sums gradients over sp and averages over dp. Rank 0
then checks the parameters against one process trained on the concatenated batches.
"""

import copy
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import autosp.integrations.deepspeed as autosp_ds
from autosp.mesh import data_parallel_sampler

STEPS, SEQ = 4, 256
deepspeed.init_distributed(dist_backend="gloo")  # CPU; nccl on GPUs

torch.manual_seed(0)  # the same weights on every rank
config = LlamaConfig(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", use_cache=False,
)  # fmt: skip
model = LlamaForCausalLM(config)
reference = copy.deepcopy(model) if dist.get_rank() == 0 else None

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
engine, optimizer, _, _ = autosp_ds.initialize(
    model=model, optimizer=optimizer, config=Path(__file__).with_name("deepspeed_zero.json")
)
mesh = engine.mpu.mesh  # ("dp", "sp")
data = TensorDataset(torch.randint(0, config.vocab_size, (STEPS * mesh["dp"].size(), SEQ)))
loader = DataLoader(data, batch_size=1, sampler=data_parallel_sampler(data, mesh, shuffle=False))
for step, (ids,) in enumerate(loader):
    loss = engine(input_ids=ids, labels=ids).loss  # the same sequence on both SP ranks
    engine.backward(loss)
    engine.step()
    if dist.get_rank() == 0:
        print(f"step {step}: loss {loss.item():.4f} (data-parallel group 0)")

if reference is not None:  # one process, the concatenated batches, the same clipping
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for step in range(STEPS):
        ids = data.tensors[0][step * mesh["dp"].size() : (step + 1) * mesh["dp"].size()]
        reference(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
    params = dict(engine.module.module.named_parameters())
    err = max(((params[n] - p).norm() / p.norm()).item() for n, p in reference.named_parameters())
    print(f"after {STEPS} steps: max per-tensor parameter rel. error vs one process {err:.1e}")
dist.destroy_process_group()
