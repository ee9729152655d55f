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
import threading

_requested = {"signal": None}


def _handler(signum, frame):
    _requested["signal"] = signal.Signals(signum).name


def install_handlers():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


class LoaderWorkerSignals:
    """A DataLoader worker_init_fn. SLURM signals every process of a step, loader workers
    too; torch's worker handler dies of a SIGTERM its parent did not send (and SIGUSR1's
    default is to die), and the main process then fails before its checkpoint. So a
    worker blocks both and a thread takes them: a SIGTERM from the main process (the
    loader's or multiprocessing's terminate() at shutdown) still ends it at once, as
    torch's handler would; from anyone else they are ignored, and the main process ends
    its workers after it has saved."""

    def __init__(self):
        self.main_pid = os.getpid()  # the worker's parent is a forkserver under that start method

    def __call__(self, worker_id):
        if not hasattr(signal, "sigwaitinfo"):  # not on macOS: keep torch's behaviour
            return
        signals = {signal.SIGTERM, signal.SIGUSR1}
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # threads started later inherit it
        threading.Thread(target=self._take, args=(signals,), daemon=True).start()

    def _take(self, signals):
        while True:
            info = signal.sigwaitinfo(signals)
            if info.si_signo == signal.SIGTERM and info.si_pid in (self.main_pid, os.getppid()):
                os._exit(0)


def requested_locally():
    return _requested["signal"] is not None


def stop_requested(device):
    """True on every rank if any rank got the signal (one tiny all-reduce when distributed)."""
    from util.dist import any_rank  # here: the entry points import this module before torch
    return any_rank(requested_locally(), device)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits 0."""


def requeue_if_slurm():
    """After the time-limit warning (SIGUSR1), ask SLURM to requeue this job (rank 0
    only); harmless outside SLURM. Not after SIGTERM: a plain scancel must stop the job."""
    from util.dist import get_rank
    job = os.environ.get("SLURM_JOB_ID")
    if job and get_rank() == 0 and _requested["signal"] == "SIGUSR1":
        try:
            subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
            print(f"requeued SLURM job {job}")
        except (OSError, subprocess.SubprocessError) as e:
            print(f"warning: could not requeue SLURM job {job}: {e}")
