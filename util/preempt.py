"""Preemption: SIGTERM / SIGUSR1 (what SLURM sends before killing a job) ask the
run to save a checkpoint at the next step boundary and exit cleanly. Under SLURM,
after SIGUSR1 (submit_slurm.py's warning ahead of the time limit) the job requeues
itself; SIGTERM comes from preemption or `scontrol requeue`, which requeue the job
by themselves, or from `scancel`, which means stop. The relaunched command
auto-resumes. Under several processes the ranks agree on a signal only when the metrics
are read back (every --print_freq steps, CheckpointSaver.poll_preemption), so the
checkpoint may come that many steps later."""
import os
import signal
import subprocess

from util.dist import any_rank, get_rank

_requested = {"signal": None}


def _handler(signum, frame):
    _requested["signal"] = signal.Signals(signum).name


def install_handlers():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def requested_locally():
    return _requested["signal"] is not None


def stop_requested(device):
    """True on every rank if any rank got the signal (one tiny all-reduce when distributed)."""
    return any_rank(requested_locally(), device)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits 0."""


def requeue_if_slurm():
    """After the time-limit warning (SIGUSR1), ask SLURM to requeue this job (rank 0
    only); harmless outside SLURM. Not after SIGTERM: a plain scancel must stop the job."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and get_rank() == 0 and _requested["signal"] == "SIGUSR1":
        try:
            subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
            print(f"requeued SLURM job {job}")
        except (OSError, subprocess.SubprocessError) as e:
            print(f"warning: could not requeue SLURM job {job}: {e}")
