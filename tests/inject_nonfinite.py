"""Run an entry point with a NaN loss at its N-th training step (counted from 0 over
the whole process), as a test's fault injection; the product has no hook for it.

    python tests/inject_nonfinite.py N main_pretrain.py|main_finetune.py|main_linprobe.py ARGS...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine_finetune  # noqa: E402
import engine_pretrain  # noqa: E402

at, script, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
calls = [0]


def poisoned(loss):
    calls[0] += 1
    return loss + float("nan") if calls[0] - 1 == at else loss


if script == "main_pretrain.py":
    compute_losses = engine_pretrain.compute_losses

    def poisoned_losses(*a, **k):
        loss, parts, logits = compute_losses(*a, **k)
        return poisoned(loss), parts, logits

    engine_pretrain.compute_losses = poisoned_losses
    import main_pretrain as entry
else:  # the supervised loss is the criterion the entry point hands to engine_finetune
    train_one_epoch = engine_finetune.train_one_epoch

    def poisoned_epoch(model, criterion, *a, **k):
        return train_one_epoch(model, lambda out, y: poisoned(criterion(out, y)), *a, **k)

    engine_finetune.train_one_epoch = poisoned_epoch
    import eval_setup
    eval_setup.train_one_epoch = poisoned_epoch
    entry = __import__(script[:-3])
entry.main(entry.get_args_parser().parse_args(argv))
