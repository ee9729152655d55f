"""submit_slurm.py on a real one-node SLURM cluster (tests/cluster/slurm_cluster.py:
2 CPUs, 127.0.0.1): a 2-task gloo pretraining, `scontrol requeue` and the
preemption signal in the middle of a run (the job comes back and ends with the
weights of an uninterrupted run), and bad submissions refused before queueing."""
import json
import os
import re
import time

import pytest
import torch

from conftest import TINY, assert_one_line_error, run_script
from slurm_cluster import SlurmCluster, missing_binaries
from util.checkpoint import list_checkpoints

# 3 epochs x 8 steps of 2 tasks x 8 images, a checkpoint after every step.
RUN = TINY + ["--batch_size", "8", "--synthetic_size", "128", "--epochs", "3", "--save_every_steps", "1",
              "--keep_last", "3"]
# CPU tasks: the documented way to submit without GPUs.
LAUNCH = ["--gpus_per_node", "0", "--tasks_per_node", "2", "--cpus_per_task", "1", "--time", "20:00"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): run tests/cluster/install.sh")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def submit(cluster, out):
    proc = run_script("submit_slurm.py", *LAUNCH, "--", "main_pretrain.py", *RUN, "--output_dir", out,
                      env=cluster.env_vars)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)


def job_log(out, job):
    with open(os.path.join(out, "slurm", f"{job}.out")) as f:
        return f.read()


def wait_for_position(out, at_least, timeout=600):
    """(epoch, step) the newest checkpoint continues from, once it reaches at_least."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = list_checkpoints(str(out))
        if found:
            _, epoch, step = found[0]
            pos = (epoch + 1, 0) if step is None else (epoch, step)
            if pos >= at_least:
                return pos
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at {at_least} in {out} after {timeout} s")


def final_model(out):
    return torch.load(os.path.join(out, "checkpoint-2.pth"), weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_finished(info, restarts, log):
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    assert info["Restarts"] == str(restarts), f"{info}\n{log}"


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    job = submit(cluster, out)
    return job, out, cluster.wait_done(job)


def test_two_task_job_writes_log_events_and_checkpoint(uninterrupted):
    job, out, info = uninterrupted
    log = job_log(out, job)
    assert_finished(info, 0, log)
    assert info["NumTasks"] == "2", info
    assert "world size 2" in log, log
    assert "distributed init rank 0/2 backend gloo" in log and "distributed init rank 1/2 backend gloo" in log
    with open(out / "log.txt") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2]
    assert [f for f in os.listdir(out) if f.startswith("events.out.tfevents")]
    state = torch.load(out / "checkpoint-2.pth", weights_only=True)
    assert state["epoch"] == 2 and len(state["rng"]) == 2  # one RNG state per task
    assert os.path.exists(out / "slurm" / "job.sbatch")


def preempted_then_resumed(log):
    """The checkpoint written on the signal is the one the requeued job resumed from."""
    m = re.search(r"preempted at epoch (\d+) step (\d+): checkpoint saved, exiting", log)
    assert m, log
    epoch, step = m.groups()
    assert re.search(rf"resumed from \S+/checkpoint-{epoch}-step{step}\.pth; starting at epoch {epoch} "
                     rf"step {step}", log), log
    return int(epoch), int(step)


def test_scontrol_requeue_resumes_and_matches_uninterrupted(cluster, uninterrupted, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out)
    seen = wait_for_position(out, (0, 1))
    cluster.run("scontrol", "requeue", job)  # SLURM sends SIGTERM to the tasks, then requeues the job
    info = cluster.wait_done(job)
    log = job_log(out, job)
    assert_finished(info, 1, log)
    assert preempted_then_resumed(log) > seen
    assert_same_weights(final_model(uninterrupted[1]), final_model(out))


def test_preemption_signal_saves_and_job_requeues_itself(cluster, uninterrupted, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out)
    seen = wait_for_position(out, (0, 1))
    # what --signal=USR1@N delivers N seconds before the time limit, sent now
    cluster.run("scancel", "--signal=USR1", job)
    info = cluster.wait_done(job)
    log = job_log(out, job)
    assert_finished(info, 1, log)  # only the job itself asked for the requeue (rank 0's scontrol requeue)
    assert preempted_then_resumed(log) > seen
    assert_same_weights(final_model(uninterrupted[1]), final_model(out))


def test_scancel_stops_the_job_after_a_checkpoint(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out)
    wait_for_position(out, (0, 1))
    cluster.run("scancel", job)  # SIGTERM: save and stop; a cancelled job must stay cancelled
    info = cluster.wait_done(job)
    log = job_log(out, job)
    assert "preempted at epoch" in log, log
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{log}"


def test_bad_submissions_fail_before_queueing(cluster, tmp_path):
    before = cluster.job_ids()
    out = tmp_path / "run"
    cases = [([], ["--data_path", tmp_path / "missing"], "data_path"),
             ([], ["--epochs", "three"], "main_pretrain.py: argument --epochs"),
             ([], ["--blr_typo", "1"], "unrecognized arguments: --blr_typo"),
             (["--partition", "nosuch"], [], "sbatch failed")]
    for options, script_args, fragment in cases:
        proc = run_script("submit_slurm.py", *LAUNCH, *options, "--", "main_pretrain.py", *TINY, *script_args,
                          "--output_dir", out, env=cluster.env_vars, timeout=300)
        assert_one_line_error(proc, fragment)
    assert cluster.job_ids() == before  # nothing was queued
    assert not os.path.exists(out / "log.txt")
