"""2 gloo processes whose output_dir listings differ (as ranks on a network file system
can see different newest files): each rank's output_dir is ROOT/rank<r>, and rank 1's
holds a newer checkpoint (and a checkpoint-best.pth that rank 0's does not). Writes the
checkpoint each rank resumed from and the previous best each rank's fine-tune keeps. Run by
tests/test_survival.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/resume_choice_worker.py ROOT OUT_JSON
"""
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.checkpoint import find_resume_checkpoint  # noqa: E402
from util.dist import all_gather_object  # noqa: E402
from eval_setup import _previous_best  # noqa: E402


def main():
    root, out = sys.argv[1:3]
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    args = SimpleNamespace(resume="", auto_resume=True, output_dir=os.path.join(root, f"rank{rank}"))
    path, state = find_resume_checkpoint(args)
    retry_path, _ = find_resume_checkpoint(args, newest=True)  # the reload after a non-finite loss
    chosen = all_gather_object((path, state["epoch"], retry_path, _previous_best(args)))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(chosen, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
