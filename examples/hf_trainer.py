"""Train with the Hugging Face Trainer, sequence-parallel: ``SequenceParallelTrainer``.

Run with:  torchrun --nproc-per-node 2 examples/hf_trainer.py
Reference: python examples/hf_trainer.py   (one process, the plain Trainer: the same losses)
"""

import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import autosp
from autosp.integrations.trainer import SequenceParallelTrainer

SEQ_LEN = 2048


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random rows of SEQ_LEN tokens (stand-in for a tokenized corpus)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 256, (SEQ_LEN,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", use_cache=False,
)  # fmt: skip
model = LlamaForCausalLM(config)
args = TrainingArguments(
    output_dir=tempfile.mkdtemp(prefix="hf_trainer_"),
    per_device_train_batch_size=1,
    max_steps=4,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
    disable_tqdm=True,
)
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: all ranks form one SP group
    trainer = SequenceParallelTrainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(),
        autosp_config=autosp.Config(backend="aot_eager"),  # fast to compile on a CPU
    )
else:
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
trainer.train()
if trainer.is_world_process_zero():
    losses = [f"{h['loss']:.6f}" for h in trainer.state.log_history if "loss" in h]
    print(f"{type(trainer).__name__}, {args.world_size} process(es): losses {' '.join(losses)}")
