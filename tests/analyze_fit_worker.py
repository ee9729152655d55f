"""main_analyze.py with its linear fit observed: each rank that runs the fit writes
fit-rank{R}.json (rows fitted, their device) into DIR; then the fit runs as usual.

    python -m torch.distributed.run --nproc_per_node 2 tests/analyze_fit_worker.py DIR ARGS...
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_analyze  # noqa: E402

real_fit = main_analyze.fast_linear_eval


def observed_fit(train_x, *args, **kw):
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(sys.argv[1], f"fit-rank{rank}.json"), "w") as f:
        json.dump({"n_train": train_x.shape[0], "device": str(train_x.device)}, f)
    return real_fit(train_x, *args, **kw)


if __name__ == "__main__":
    main_analyze.fast_linear_eval = observed_fit
    main_analyze.main(main_analyze.get_args_parser().parse_args(sys.argv[2:]))
