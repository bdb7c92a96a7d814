"""Data parallel beside sequence parallel: 2 data-parallel groups of 2 sequence-parallel ranks,
gradient accumulation, clipping and AdamW, against one process on every group's sequences.

Run with:  torchrun --nproc-per-node 4 examples/data_parallel.py         (autosp reduces)
           torchrun --nproc-per-node 4 examples/data_parallel.py --ddp   (DDP reduces)
"""

import argparse
import contextlib
import copy
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import autosp
from autosp.integrations.ddp import wrap_ddp
from autosp.mesh import data_parallel_sampler, sequence_parallel_mesh

parser = argparse.ArgumentParser()
parser.add_argument("--ddp", action="store_true", help="wrap in DistributedDataParallel")
args = parser.parse_args()

cuda = torch.cuda.is_available()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
dist.init_process_group("nccl" if cuda else "gloo")
mesh = sequence_parallel_mesh(sp=2)  # ("dp", "sp"): dp = world / 2
dp = mesh["dp"].size()

torch.manual_seed(0)  # the same weights and data on every rank
config = LlamaConfig(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", use_cache=False,
)  # fmt: skip
model = LlamaForCausalLM(config).to(device)
ref_model = copy.deepcopy(model)  # one process, for comparison
sequences = torch.randint(0, config.vocab_size, (16, 512))
dataset = TensorDataset(sequences)
# Each SP group's ranks get the same sequences, each DP group its own share.
loader = DataLoader(
    dataset, batch_size=1, sampler=data_parallel_sampler(dataset, mesh, shuffle=False)
)

parallel = autosp.parallelize(model, mesh=mesh, backend="inductor" if cuda else "aot_eager")
if args.ddp:
    parallel = wrap_ddp(parallel)  # DDP over dp x sp, with autosp's comm hook
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
ref_optimizer = torch.optim.AdamW(ref_model.parameters(), lr=1e-3)

ACCUMULATE = 2  # micro-batches per step
batches = iter(loader)
for step in range(3):
    loss_sum = torch.zeros((), device=device)
    for micro in range(ACCUMULATE):
        (ids,) = next(batches)
        ids = ids.to(device)
        last = micro == ACCUMULATE - 1  # reduce once per step, at the last micro-batch
        with contextlib.nullcontext() if last else parallel.no_sync():
            loss = parallel(input_ids=ids, labels=ids).loss / ACCUMULATE
            loss.backward()
        loss_sum += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)

    # One process on this step's sequences of every DP group, in one batch.
    first = step * ACCUMULATE * dp  # the sampler gives group g the items g, g + dp, ...
    ref_ids = sequences[first : first + ACCUMULATE * dp].to(device)
    ref_loss = ref_model(input_ids=ref_ids, labels=ref_ids).loss
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm=1.0)
    grad_err = max(
        ((p.grad - q.grad).norm() / q.grad.norm()).item()
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True)
    )
    dist.all_reduce(loss_sum)  # the mean of the DP groups' losses (each SP rank holds its group's)
    mean_loss = loss_sum.item() / dist.get_world_size()

    optimizer.step()
    ref_optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ref_optimizer.zero_grad(set_to_none=True)
    if dist.get_rank() == 0:
        print(
            f"step {step}: loss {mean_loss:.6f} (one process {ref_loss.item():.6f}), grad norm "
            f"{norm.item():.6f} ({ref_norm.item():.6f}), max gradient rel. error {grad_err:.1e}"
        )
dist.destroy_process_group()
