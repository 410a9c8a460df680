"""One rank of tests/integrations/test_trainer.py's two-process run: Trainer over a sparsified tiny
model, DDP on gloo. argv: BASE OUTPUT. PIECE_TEST_COMM_LOG=FILE: rank 0 logs each all-reduced
bucket's bytes. Rank 0 writes OUTPUT/summary.json: k, steps, and whether the ranks' values agree."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import piece_surgery as ps
from piece_surgery.data.batches import collate
from piece_surgery.data.dataset import dataset_from_records
from piece_surgery.integrations.trainer import PieceCallback

RECORDS = [{"text": f"def f{i}(x):\n    return x + {i}"} for i in range(8)]


def main() -> None:
    base, output = sys.argv[1], Path(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(base)
    mask = ps.score(model, RECORDS, method="piece-s", density=0.02)
    sparse = ps.sparsify(model, mask)
    tokenizer = sparse.checkpoint.load_tokenizer()
    examples = dataset_from_records(RECORDS, tokenizer, max_length=64).examples
    args = TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=1,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        remove_unused_columns=False,
        save_strategy="no",
        disable_tqdm=True,
    )

    class Logged(Trainer):
        """Trainer whose DDP model (the one training_step gets) logs every bucket it all-reduces."""

        hooked = False

        def training_step(self, model, inputs, num_items_in_batch=None):
            log = os.environ.get("PIECE_TEST_COMM_LOG")
            if log and not self.hooked and dist.get_rank() == 0 and hasattr(model, "register_comm_hook"):
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                def counting(state, bucket):
                    with open(log, "a") as f:
                        size = bucket.buffer().numel() * bucket.buffer().element_size()
                        f.write(json.dumps({"bytes": size}) + "\n")
                    return allreduce_hook(state, bucket)

                model.register_comm_hook(None, counting)
                self.hooked = True
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Logged(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        callbacks=[PieceCallback(sparse)],
    )
    trainer.train()
    flat = torch.cat([v.detach().reshape(-1) for v in sparse.values.values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        agree = all(torch.equal(gathered[0], g) for g in gathered)
        summary = {"k": mask.k, "steps": trainer.state.global_step, "ranks_agree": agree}
        (output / "summary.json").write_text(json.dumps(summary))
    # Past here the run has done everything it was asked: gloo's threads (with Trainer's process
    # group) can abort the interpreter's exit ("terminate called without an active exception") or
    # hang in it, so the rank leaves at once after an orderly teardown.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
