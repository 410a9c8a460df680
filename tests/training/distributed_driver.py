"""One rank of a torchrun test: the piece-surgery CLI with test instruments set by environment
variables, then run as usual.

PIECE_TEST_COMM_LOG=FILE  rank 0 appends the bytes of each gradient bucket DDP all-reduces
PIECE_TEST_NAN_RANK=R     on rank R, the loss is NaN from the 2nd micro-batch of training on (the
                          probe before the first step is the first loss)
PIECE_TEST_STOP_AT=S      every rank stops (Ctrl-C) once the state of step S is saved (with
PIECE_TEST_SAVE_EVERY, the run's --save-every)
"""

import json
import os
import sys


def instrument() -> None:
    import torch

    import piece_surgery.training.loop as trainer
    import piece_surgery.training.steps as steps

    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("PIECE_TEST_COMM_LOG") and rank == 0:
        log = os.environ["PIECE_TEST_COMM_LOG"]
        real = steps.MicroBatchLoss.__init__

        def with_hook(self, *args, **kwargs):
            real(self, *args, **kwargs)
            if self.ddp is not None:
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                def counting(state, bucket):
                    with open(log, "a") as f:
                        f.write(
                            json.dumps({"bytes": bucket.buffer().numel() * bucket.buffer().element_size()})
                            + "\n"
                        )
                    return allreduce_hook(state, bucket)

                self.ddp.register_comm_hook(None, counting)

        steps.MicroBatchLoss.__init__ = with_hook
    if os.environ.get("PIECE_TEST_NAN_RANK") == str(rank):
        real_loss = steps.token_loss_sum
        calls = [0]

        def nan_loss(logits, labels):
            calls[0] += 1
            loss, count = real_loss(logits, labels)
            return (loss * float("nan") if calls[0] >= 3 else loss), count

        steps.token_loss_sum = nan_loss
    if os.environ.get("PIECE_TEST_STOP_AT"):
        stop_at, every = int(os.environ["PIECE_TEST_STOP_AT"]), int(os.environ["PIECE_TEST_SAVE_EVERY"])
        real_save, real_gather = trainer.save_state, trainer.World.gather
        gathers = [0]

        def save_then_stop(*args, **kwargs):  # rank 0 saves the state, then stops
            real_save(*args, **kwargs)
            if args[3] == stop_at:
                raise KeyboardInterrupt

        def gather_then_stop(self, value):  # the others stop once rank 0 has their random state
            out = real_gather(self, value)
            if isinstance(value, torch.Tensor):
                gathers[0] += 1
                if gathers[0] == stop_at // every and self.rank != 0:
                    raise KeyboardInterrupt
            return out

        trainer.save_state = save_then_stop
        trainer.World.gather = gather_then_stop


def main() -> None:
    instrument()
    sys.argv = ["piece-surgery", *sys.argv[1:]]
    from piece_surgery.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
