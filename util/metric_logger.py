"""Console progress and metric averaging without a host sync on every step.

Values are accumulated as device tensors; they are read back (one sync) only
every `print_freq` steps, where the window averages are printed and handed to
a callback (TensorBoard), and at the end of the epoch.
"""
import datetime
import json
import os
import time

import torch

from util.dist import all_reduce_sum, is_main_process


class MetricLogger:
    def __init__(self, totals=None, delimiter="  "):
        self.delimiter = delimiter
        self.window = {}    # name -> [device sum, count] since the last flush
        # name -> [float sum, count] over the epoch; a resumed epoch starts from its saved sums
        self.totals = {k: list(v) for k, v in (totals or {}).items()}

    def update(self, n=1, **values):
        """Add values weighted by n (e.g. a batch mean with n = batch size)."""
        for k, v in values.items():
            v = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
            s = self.window.setdefault(k, [0.0, 0])
            s[0] = s[0] + v.float() * n
            s[1] += n

    def flush(self):
        """Read the window back to the host (one sync) and fold it into the totals."""
        if not self.window:
            return {}
        keys = list(self.window)
        values = [self.window[k][0] for k in keys]
        dev = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
        sums = torch.stack([torch.as_tensor(v, device=dev).float() for v in values]).tolist()
        out = {}
        for k, s in zip(keys, sums):
            n = self.window[k][1]
            out[k] = s / max(n, 1)
            t = self.totals.setdefault(k, [0.0, 0])
            t[0] += s
            t[1] += n
        self.window = {}
        return out

    def totals_after_flush(self, distributed=True):
        """The epoch's running sums so far (plain floats), with distributed=True summed over
        ranks (every rank calls it at the same step): what a checkpoint keeps."""
        self.flush()
        keys = sorted(self.totals)
        t = torch.tensor([self.totals[k] for k in keys], dtype=torch.float64).reshape(len(keys), 2)
        if distributed and keys:
            all_reduce_sum(t)
        return {k: [s, int(n)] for k, (s, n) in zip(keys, t.tolist())}

    def global_avg(self, distributed=True):
        """Epoch averages; with distributed=True summed over ranks first."""
        return {k: s / max(n, 1) for k, (s, n) in self.totals_after_flush(distributed).items()}

    def log_every(self, iterable, print_freq, header="", total=None, start=0, on_flush=None,
                  batch_size=None):
        """Yield from iterable; every print_freq steps print averages, ETA and
        throughput, and call on_flush(step, values)."""
        total = total if total is not None else len(iterable)
        t0 = t_last = time.time()
        step_last = start
        width = len(str(total))
        for i, item in enumerate(iterable, start=start):
            yield item
            done = i + 1
            if done % print_freq == 0 or done == total:
                values = self.flush()
                now = time.time()
                step_time = (now - t_last) / max(done - step_last, 1)
                if batch_size:
                    values["img_per_s"] = batch_size / step_time
                eta = (now - t0) / max(done - start, 1) * (total - done)
                parts = [f"{k}: {v:.4g}" for k, v in values.items()]
                print(f"{header} [{done:>{width}}/{total}] eta: {datetime.timedelta(seconds=int(eta))}"
                      f"{self.delimiter}" + self.delimiter.join(parts) +
                      f"{self.delimiter}time: {step_time:.4f}s")
                if on_flush is not None:
                    on_flush(i, values)
                t_last, step_last = now, done
        print(f"{header} total time: {datetime.timedelta(seconds=int(time.time() - t0))}")


def tensorboard_writer(log_dir):
    """A SummaryWriter on the main process, None elsewhere."""
    if not is_main_process() or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def append_log(output_dir, stats):
    """One JSON line per epoch in output_dir/log.txt (main process only)."""
    if is_main_process() and output_dir:
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")
