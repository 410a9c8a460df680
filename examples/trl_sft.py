"""PIECE inside TRL's SFTTrainer, offline on a tiny random model: score the model on a chat
dataset, make only the mask's entries trainable, train with SFTTrainer (chat template, loss on the
assistant's answers, gradient accumulation, checkpoints), and check that the delta it saved
applies to the base as the model TRL trained, bit for bit.

    python examples/trl_sft.py [WORK_FOLDER]        # needs: pip install 'piece-surgery[trl]'
"""

import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

import piece_surgery
from piece_surgery.models.tiny import write_tiny_model

work = Path(sys.argv[1] if len(sys.argv) > 1 else "out/trl-sft")
work.mkdir(parents=True, exist_ok=True)
base = write_tiny_model(work / "base", overwrite=True)  # use your own model here
chats = [
    {"messages": [{"role": "user", "content": f"Square {n}."}, {"role": "assistant", "content": f"{n * n}"}]}
    for n in range(16)
]

model = AutoModelForCausalLM.from_pretrained(base)
mask = piece_surgery.score(model, chats, method="piece-r", density=0.01)  # chats as `--data` takes them
sparse = piece_surgery.sparsify(model, mask)
print(f"{mask.k:,} trainable entries of {sum(p.numel() for n, p in model.named_parameters()):,}")

config = SFTConfig(
    output_dir=str(work / "sft"),
    max_steps=6,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    learning_rate=1e-3,  # piece-r's default, as `piece-surgery train`
    adam_beta2=0.95,
    lr_scheduler_type="constant",
    save_steps=3,  # a delta in every checkpoint: sft/checkpoint-3/piece-delta, ...
    logging_steps=1,
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
)
trainer = SFTTrainer(
    model=model,
    args=config,
    train_dataset=Dataset.from_list(chats),
    callbacks=[piece_surgery.PieceCallback(sparse)],
)
trainer.train()

delta_folder = work / "sft" / "piece-delta"
merged = piece_surgery.apply(str(base), [str(delta_folder)], work / "merged", overwrite=True)
exact = all(
    torch.equal(weight, dict(model.named_parameters())[name].detach())
    for name, weight in AutoModelForCausalLM.from_pretrained(work / "merged").state_dict().items()
    if name in dict(model.named_parameters())
)
print(f"delta: {piece_surgery.load_delta(delta_folder).count:,} changed entries in {delta_folder}")
print(f"base + delta is the model TRL trained, bit for bit: {exact}")
