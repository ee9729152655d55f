"""Jobs on a real SLURM cluster of separate hosts (tests/cluster/slurm_cluster.py: a
controller `ctl` and compute hosts node1-3, each its own network and host name,
2 CPUs each, one shared file system), one gloo task per host:
- submit_slurm.py on 2 hosts; `scontrol requeue` and the preemption signal in the
  middle of a run (the job comes back and ends with the weights of an uninterrupted
  run); scancel; bad submissions refused before queueing;
- plain `srun python main_pretrain.py` with no MASTER_ADDR (derived from the allocation);
- pretrain.sh under sbatch, once per host with srun, no MASTER_ADDR given;
- a host killed mid-run: the job fails within a bounded time, and requeued (on the
  hosts left) resumes to the uninterrupted run's weights."""
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time

import pytest
import torch

from conftest import REPO, TINY
from hosts import cannot_create_namespaces
from slurm_cluster import SHARED, SlurmCluster, missing_binaries
from util.checkpoint import list_checkpoints

# 2 epochs x 8 steps of 2 tasks x 8 images, a checkpoint after every step; every epoch's
# checkpoint is kept (checkpoint-0.pth: the start of the --resume job).
RUN = TINY + ["--batch_size", "8", "--synthetic_size", "128", "--epochs", "2", "--save_every_steps", "1",
              "--keep_last", "3", "--save_every", "1"]
# CPU tasks, one per host: the documented way to submit without GPUs.
LAUNCH = ["--nodes", "2", "--gpus_per_node", "0", "--tasks_per_node", "1", "--cpus_per_task", "1",
          "--time", "20:00"]


@pytest.fixture(scope="module")
def cluster():
    why = cannot_create_namespaces()
    if why:
        pytest.skip(f"separate hosts: {why}")
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): run tests/cluster/install.sh")
    os.makedirs(SHARED, exist_ok=True)
    c = SlurmCluster(tempfile.mkdtemp(prefix="slurm-", dir=SHARED))
    try:
        c.start()
        yield c
    finally:
        c.stop()
        if not os.environ.get("CLUSTER_KEEP"):  # CLUSTER_KEEP=1: keep logs and runs to look at
            shutil.rmtree(c.root, ignore_errors=True)
            try:
                os.rmdir(SHARED)  # when no other run is in it
            except OSError:
                pass


def new_out(cluster, name):
    return os.path.join(tempfile.mkdtemp(prefix=f"{name}-", dir=cluster.root), "run")


def submit(cluster, out, *launch, extra=()):
    proc = cluster.run(sys.executable, os.path.join(REPO, "submit_slurm.py"), *(launch or LAUNCH), "--",
                       "main_pretrain.py", *RUN, "--output_dir", out, *extra, check=False, timeout=300)
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
    return torch.load(os.path.join(out, "checkpoint-1.pth"), weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_finished(info, restarts, log):
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    assert info["Restarts"] == str(restarts), f"{info}\n{log}"


def assert_one_rank_per_host(log):
    assert "world size 2" in log, log
    assert re.search(r"distributed init rank 0/2 backend gloo on node1\b", log), log
    assert re.search(r"distributed init rank 1/2 backend gloo on node2\b", log), log


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    out = new_out(cluster, "uninterrupted")
    job = submit(cluster, out)
    return job, out, cluster.wait_done(job)


def test_two_host_job_writes_log_events_and_checkpoint(uninterrupted):
    job, out, info = uninterrupted
    log = job_log(out, job)
    assert_finished(info, 0, log)
    assert info["NumNodes"] == "2" and info["NumTasks"] == "2" and info["NodeList"] == "node[1-2]", info
    assert_one_rank_per_host(log)
    with open(os.path.join(out, "log.txt")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]
    assert [f for f in os.listdir(out) if f.startswith("events.out.tfevents")]
    state = torch.load(os.path.join(out, "checkpoint-1.pth"), weights_only=True)
    assert state["epoch"] == 1 and len(state["rng"]) == 2  # one RNG state per task
    assert os.path.exists(os.path.join(out, "slurm", "job.sbatch"))


def test_plain_srun_on_two_hosts_derives_the_master_and_matches(cluster, uninterrupted):
    """`srun python main_pretrain.py` with no MASTER_ADDR/MASTER_PORT anywhere: one job of
    world size 2 (rendezvous at the allocation's first host), not two runs of one."""
    out = new_out(cluster, "srun")
    proc = cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--kill-on-bad-exit=1",
                       sys.executable, os.path.join(REPO, "main_pretrain.py"), *RUN, "--output_dir", out,
                       check=False, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert_one_rank_per_host(proc.stdout)
    assert_same_weights(final_model(uninterrupted[1]), final_model(out))


# PRETRAIN.md's sbatch lines for pretrain.sh, with the CPU tasks of this cluster
PRETRAIN_SH_SBATCH = """#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --cpus-per-task=2
#SBATCH --signal=USR1@120 --requeue --open-mode=append
#SBATCH --output={out}/%j.out
srun --kill-on-bad-exit=1 --cpus-per-task=2 bash {repo}/pretrain.sh {args} --output_dir {out}
"""
PRETRAIN_SH_ENV = {"RECIPE": "mae", "GPUS_PER_NODE": "1", "EFF_BATCH": "16", "PYTHON": sys.executable}


def sbatch(cluster, script, text, env):
    with open(script, "w") as f:
        f.write(text)
    return re.search(r"Submitted batch job (\d+)", cluster.run("sbatch", script, env=env).stdout).group(1)


def submit_pretrain_sh(cluster, name):
    out = new_out(cluster, name)
    os.makedirs(out)
    job = sbatch(cluster, os.path.join(out, "job.sbatch"),
                 PRETRAIN_SH_SBATCH.format(out=out, repo=REPO, args=" ".join(RUN)), PRETRAIN_SH_ENV)
    return job, out


def read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def pretrain_sh_uninterrupted(cluster):
    job, out = submit_pretrain_sh(cluster, "pretrain_sh")
    return job, out, cluster.wait_done(job)


def test_pretrain_sh_under_sbatch_on_two_hosts(cluster, pretrain_sh_uninterrupted):
    """PRETRAIN.md's SLURM command: pretrain.sh once per host (srun), torchrun's master
    and port from the allocation, the effective batch printed and kept."""
    job, out, info = pretrain_sh_uninterrupted
    log = read(os.path.join(out, f"{job}.out"))
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}"
    port = 15000 + int(job) % 10000
    plan = f"effective batch 16 = 8 per GPU x 2 GPUs (2 nodes x 1) x accum 1; torchrun rendezvous at node1:{port}"
    assert log.count(plan) == 2 and "this is node 0" in log and "this is node 1" in log, log
    assert_one_rank_per_host(log)
    assert os.path.exists(os.path.join(out, "checkpoint-1.pth"))
    env = PRETRAIN_SH_ENV

    # one launcher per node, not per task: refused at once
    proc = cluster.run("srun", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "bash",
                       os.path.join(REPO, "pretrain.sh"), *RUN, "--output_dir", os.path.join(out, "per_task"),
                       env=env, check=False, timeout=300)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(err) == 4, proc.stderr
    assert set(err) == {"error: srun started 4 tasks on 2 nodes: run pretrain.sh once per node "
                        "(srun --ntasks-per-node=1)"}, err

    # the same script without srun would start node 0 only: refused at once
    bare = os.path.join(out, "bare.sbatch")
    with open(bare, "w") as f:
        f.write(f"#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --output={out}/bare-%j.out\n"
                f"bash {REPO}/pretrain.sh {' '.join(RUN)} --output_dir {out}/bare\n")
    job = re.search(r"Submitted batch job (\d+)", cluster.run("sbatch", bare, env=env).stdout).group(1)
    info = cluster.wait_done(job, timeout=120)
    with open(os.path.join(out, f"bare-{job}.out")) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert lines == ["error: 2 nodes: start pretrain.sh once per node with srun --ntasks-per-node=1 bash "
                     "pretrain.sh ..."], lines


def preempted_then_resumed(log):
    """The checkpoint written on the signal is the one the requeued job resumed from."""
    m = re.search(r"preempted at epoch (\d+) step (\d+): checkpoint saved, exiting", log)
    assert m, log
    epoch, step = m.groups()
    assert re.search(rf"resumed from \S+/checkpoint-{epoch}-step{step}\.pth; starting at epoch {epoch} "
                     rf"step {step}", log), log
    return int(epoch), int(step)


def test_scontrol_requeue_resumes_and_matches_uninterrupted(cluster, uninterrupted):
    out = new_out(cluster, "requeue")
    # SLURM signals every process of the step, the loader workers too (they must live on)
    job = submit(cluster, out, extra=("--num_workers", "2"))
    seen = wait_for_position(out, (0, 1))
    cluster.run("scontrol", "requeue", job)  # SLURM sends SIGTERM to the tasks, then requeues the job
    info = cluster.wait_done(job)
    log = job_log(out, job)
    assert_finished(info, 1, log)
    assert preempted_then_resumed(log) > seen
    assert_same_weights(final_model(uninterrupted[1]), final_model(out))


def test_preemption_signal_saves_and_job_requeues_itself(cluster, uninterrupted):
    out = new_out(cluster, "usr1")
    job = submit(cluster, out, extra=("--num_workers", "2"))
    seen = wait_for_position(out, (0, 1))
    # what --signal=USR1@N delivers N seconds before the time limit, sent now
    cluster.run("scancel", "--signal=USR1", job)
    info = cluster.wait_done(job)
    log = job_log(out, job)
    assert_finished(info, 1, log)  # only the job itself asked for the requeue (rank 0's scontrol requeue)
    assert preempted_then_resumed(log) > seen
    assert_same_weights(final_model(uninterrupted[1]), final_model(out))


def test_pretrain_sh_preempted_by_its_signal_resumes_to_the_uninterrupted_weights(
        cluster, pretrain_sh_uninterrupted):
    """The documented sbatch lines (--signal=USR1@120 --requeue): the time-limit warning
    reaches the workers through bash and torchrun (which would die of it), they save,
    rank 0 requeues the job, and the requeued job resumes to the uninterrupted weights."""
    job, out = submit_pretrain_sh(cluster, "pretrain_sh_usr1")
    seen = wait_for_position(out, (0, 1))
    cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@120 sends 120 s before the limit
    info = cluster.wait_done(job)
    log = read(os.path.join(out, f"{job}.out"))
    assert_finished(info, 1, log)
    assert preempted_then_resumed(log) > seen
    assert_same_weights(final_model(pretrain_sh_uninterrupted[1]), final_model(out))


def test_two_single_node_jobs_on_one_node_at_once(cluster):
    """Two 1-node pretrain.sh jobs share node1 (1 CPU each): each torchrun rendezvous
    gets its own port (both had 127.0.0.1:29500: the second failed with EADDRINUSE)."""
    root = tempfile.mkdtemp(prefix="shared_node-", dir=cluster.root)
    env = {**PRETRAIN_SH_ENV, "EFF_BATCH": "8"}
    jobs = []
    for name in ("a", "b"):
        out = os.path.join(root, name)
        os.makedirs(out)
        text = (f"#!/bin/bash\n#SBATCH --nodes=1 --ntasks=1 --cpus-per-task=1 --nodelist=node1\n"
                f"#SBATCH --output={out}/%j.out\n"
                f"srun --cpus-per-task=1 bash {REPO}/pretrain.sh {' '.join(RUN)} --output_dir {out}\n")
        jobs.append((sbatch(cluster, os.path.join(out, "job.sbatch"), text, env), out))
    infos = [cluster.wait_done(job) for job, _ in jobs]
    ports = []
    for (job, out), info in zip(jobs, infos):
        log = read(os.path.join(out, f"{job}.out"))
        assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node1", f"{info}\n{log}"
        port = 15000 + int(job) % 10000
        assert f"x accum 1; torchrun rendezvous at 127.0.0.1:{port}, this is node 0" in log, log
        ports.append(port)
    assert ports[0] != ports[1]
    assert infos[1]["StartTime"] < infos[0]["EndTime"], infos  # they ran at the same time
    assert_same_weights(final_model(jobs[0][1]), final_model(jobs[1][1]))


def test_requeued_resume_job_continues_from_its_own_checkpoints(cluster, uninterrupted):
    """A job started with --resume X, requeued twice: each time it continues from its own
    newest checkpoint (not X again) and ends at the uninterrupted run's weights. Its
    --output_dir has a space (the #SBATCH log lines are quoted)."""
    out = os.path.join(tempfile.mkdtemp(prefix="resume-", dir=cluster.root), "my run")
    start = os.path.join(uninterrupted[1], "checkpoint-0.pth")
    job = submit(cluster, out, extra=["--resume", start])
    seen = (1, 0)
    for restarts in (1, 2):
        seen = wait_for_position(out, (seen[0], seen[1] + 1))
        cluster.run("scontrol", "requeue", job)
        cluster.wait_job(job, lambda i, r=restarts: i["Restarts"] == str(r) and i["JobState"] == "RUNNING",
                         timeout=300)
        seen = max(seen, wait_for_position(out, seen))
    info = cluster.wait_done(job)
    log = job_log(out, job)
    assert_finished(info, 2, log)
    resumed = re.findall(rf"--resume {re.escape(start)} started this run; continuing from its newest "
                         rf"checkpoint \S+ run/checkpoint-1-step(\d+)\.pth", log)
    assert len(resumed) == 2 and int(resumed[0]) < int(resumed[1]), log
    assert_same_weights(final_model(uninterrupted[1]), final_model(out))


def test_frozen_host_ends_the_job_within_the_timeout_and_the_requeued_job_resumes(cluster, uninterrupted):
    """Every process of node2 stopped (SIGSTOP, its slurmd too: a host that hangs, no
    connection closes): the task on node1 gives up after --dist_timeout (0.5 min here)
    with one line naming the wait; SLURM sets node2 DOWN and requeues the job, which
    resumes on node1 and node3 to the uninterrupted weights. node2 is killed and booted
    again afterwards."""
    out = new_out(cluster, "frozen")
    job = submit(cluster, out, extra=["--dist_timeout", "0.5"])
    seen = wait_for_position(out, (0, 2))
    assert training_tasks(cluster, "node1")
    frozen = cluster.hosts.pids("node2")
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    t0 = time.time()
    try:
        while training_tasks(cluster, "node1"):
            assert time.time() - t0 < 120, "the task on node1 still runs 120 s after node2 froze"
            time.sleep(0.2)
        ended = time.time() - t0
        print(f"task on node1 ended {ended:.1f} s after node2 froze")
        assert ended > 25, ended  # it waited out the timeout: nothing told it the peer was gone
        cluster.wait_job(job, lambda i: i["Restarts"] == "1", timeout=240)
        info = cluster.wait_done(job)
    finally:
        cluster.kill_host("node2")  # SIGKILL ends stopped processes too
    log = job_log(out, job)
    err = read(os.path.join(out, "slurm", f"{job}.err"))
    assert re.search(r"^error: rank 0: a collective \w+ waited 30 s \(--dist_timeout\) for another rank",
                     err, re.M) and "Traceback" not in err, err
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log}"
    assert info["NodeList"] == "node[1,3]", info
    m = re.search(r"resumed from \S+/checkpoint-(\d+)-step(\d+)\.pth; starting at epoch \d+ step \d+", log)
    assert m and (int(m.group(1)), int(m.group(2))) >= seen, log
    assert_same_weights(final_model(uninterrupted[1]), final_model(out))
    cluster.boot_host("node2")  # ReturnToService=2: DOWN until its slurmd registers again


def training_tasks(cluster, host):
    """Pids of the python main_pretrain.py processes running on host (not the srun
    that started them)."""
    found = []
    for pid in cluster.hosts.pids(host):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"python" in os.path.basename(argv[0]) and any(a.endswith(b"main_pretrain.py") for a in argv):
                found.append(pid)
        except OSError:
            pass
    return found


def test_killed_host_fails_the_job_promptly_and_the_requeued_job_resumes(cluster, uninterrupted):
    """node2 crashes mid-run (its slurmd, step and task end at once): the task on node1
    loses its peer and exits at once instead of waiting in a collective; SLURM finds
    node2 gone (SlurmdTimeout) and requeues the job, which resumes on node1 and node3
    from the last checkpoint to the weights of the uninterrupted run. (node2 stays down:
    booted at once, it could take a late kill order meant for the job's first run.)"""
    out = new_out(cluster, "hostkill")
    job = submit(cluster, out)
    seen = wait_for_position(out, (0, 2))
    assert training_tasks(cluster, "node1")
    t0 = time.time()
    cluster.kill_host("node2")
    while training_tasks(cluster, "node1"):
        assert time.time() - t0 < 60, "the task on node1 still runs 60 s after its peer's host died"
        time.sleep(0.2)
    print(f"task on node1 ended {time.time() - t0:.1f} s after node2 was killed")
    # SLURM finds node2 gone (SlurmdTimeout), sets it DOWN and requeues the job (--requeue),
    # which runs again on the hosts left (node1, node3)
    info = cluster.wait_job(job, lambda i: i["Restarts"] == "1", timeout=180)
    print(f"job {job} requeued {time.time() - t0:.0f} s after node2 was killed")
    assert cluster.sinfo_state("node2").startswith("down"), cluster.sinfo_state("node2")
    info = cluster.wait_done(job)
    log = job_log(out, job)
    with open(os.path.join(out, "slurm", f"{job}.err")) as f:
        err = f.read()
    assert re.search(r"^error: rank 0: another rank went away mid-collective \(gloo: Connection (closed|reset) "
                     r"by peer", err, re.M) and "Traceback" not in err, err
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log}"
    assert info["NodeList"] == "node[1,3]", info
    m = re.search(r"resumed from \S+/checkpoint-(\d+)-step(\d+)\.pth; starting at epoch \d+ step \d+", log)
    assert m and (int(m.group(1)), int(m.group(2))) >= seen, log
    assert_same_weights(final_model(uninterrupted[1]), final_model(out))


def test_scancel_stops_the_job_after_a_checkpoint(cluster):
    out = new_out(cluster, "scancel")
    job = submit(cluster, out)
    wait_for_position(out, (0, 1))
    cluster.run("scancel", job)  # SIGTERM: save and stop; a cancelled job must stay cancelled
    info = cluster.wait_done(job)
    log = job_log(out, job)
    assert "preempted at epoch" in log, log
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{log}"


def test_bad_submissions_fail_before_queueing(cluster):
    before = cluster.job_ids()
    out = new_out(cluster, "bad")
    cases = [([], ["--data_path", os.path.join(out, "missing")], "data_path"),
             ([], ["--epochs", "three"], "main_pretrain.py: argument --epochs"),
             ([], ["--blr_typo", "1"], "unrecognized arguments: --blr_typo"),
             (["--partition", "nosuch"], [], "sbatch failed"),
             ([], ["--output_dir", "/tmp/node-local-run"], "node-local")]
    for options, script_args, fragment in cases:
        if "--output_dir" not in script_args:
            script_args = script_args + ["--output_dir", out]
        proc = cluster.run(sys.executable, os.path.join(REPO, "submit_slurm.py"), *LAUNCH, *options, "--",
                           "main_pretrain.py", *TINY, *script_args, check=False, timeout=300)
        # a checkout in node-local /tmp (CI's clone may be there) is rightly warned about
        err = [line for line in proc.stderr.splitlines()
               if line.strip() and not line.startswith("warning: the code lives in node-local")]
        assert proc.returncode != 0 and len(err) == 1 and err[0].startswith("error: "), proc.stderr
        assert fragment in err[0] and "Traceback" not in proc.stdout + proc.stderr, err[0]
    assert cluster.job_ids() == before  # nothing was queued
    assert not os.path.exists(os.path.join(out, "log.txt"))
