"""The SLURM launcher (sbatch + srun, one task per GPU or CPU tasks) and the SLURM rank
variables. Jobs on a real SLURM cluster: tests/cluster/ (`make test-cluster`)."""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, assert_one_line_error, free_port, run_script


def test_dry_run_script(tmp_path):
    out = "/shared/runs/x"  # not created by a dry run
    proc = run_script("submit_slurm.py", "--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu",
                      "--time", "4:00:00", "--dry_run", "--", "main_pretrain.py", "--output_dir", out,
                      "--reg", "tcr", "--centering", "False")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --requeue", "#SBATCH --signal=USR1@120", '#SBATCH --partition="gpu"',
                 "#SBATCH --time=4:00:00", f'#SBATCH --output="{out}/slurm/%j.out"'):
        assert line in text.splitlines(), line
    assert "#SBATCH --mem-per-gpu=60G" in text.splitlines()
    # srun of SLURM >= 22.05 does not inherit --cpus-per-task from sbatch
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=10 " in text
    assert "export MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))" in text.splitlines()  # jobs sharing a node
    assert f"main_pretrain.py --output_dir {out} --reg tcr --centering False" in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_dry_run_quotes_an_output_dir_with_spaces_and_percent(tmp_path):
    """sbatch splits an #SBATCH line at spaces outside quotes and reads % as a file-name
    pattern: the log lines are quoted, a literal % doubled; the srun line is shell-quoted.
    A file list is a valid --data_path."""
    out = tmp_path / "my runs" / "100% tcr"
    listing = tmp_path / "files.txt"
    listing.write_text("a.jpg\n")
    proc = run_script("submit_slurm.py", "--gpus_per_node", "0", "--tasks_per_node", "1", "--job_name", "mmae b16",
                      "--account", "lab x", "--dry_run", "--", "main_pretrain.py", "--output_dir", out,
                      "--data_path", listing, "--labels", "none")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert '#SBATCH --job-name="mmae b16"' in lines and '#SBATCH --account="lab x"' in lines
    assert f'#SBATCH --output="{tmp_path}/my runs/100%% tcr/slurm/%j.out"' in lines, proc.stdout
    assert f'#SBATCH --error="{tmp_path}/my runs/100%% tcr/slurm/%j.err"' in lines
    assert f"--output_dir '{out}'" in proc.stdout
    assert_one_line_error(run_script("submit_slurm.py", "--dry_run", "--", "main_pretrain.py", "--output_dir",
                                     tmp_path / 'a"b'), "double quote or newline")


def test_dry_run_cpu_tasks(tmp_path):
    proc = run_script("submit_slurm.py", "--gpus_per_node", "0", "--tasks_per_node", "2", "--cpus_per_task", "1",
                      "--mem", "4G", "--master_port", "12345", "--dry_run", "--", "main_pretrain.py",
                      "--output_dir", tmp_path / "run", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=4G",
                 "export MASTER_PORT=12345"):
        assert line in lines, line
    assert not [line for line in lines if "gpus" in line or "mem-per-gpu" in line]
    assert not os.path.exists(tmp_path / "run")  # a dry run writes nothing


def test_help_and_usage_mistakes(tmp_path):
    proc = run_script("submit_slurm.py", "--help")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert "--tasks_per_node" in proc.stdout and "--gpus_per_node" in proc.stdout
    out = ["--output_dir", tmp_path]
    assert_one_line_error(run_script("submit_slurm.py", "main_pretrain.py", *out), "put -- between")
    assert_one_line_error(run_script("submit_slurm.py", "--dry_run", "--"), "name the script")
    assert_one_line_error(run_script("submit_slurm.py", "--nodez", "2", "--", "main_pretrain.py", *out),
                          "unrecognized arguments: --nodez")
    assert_one_line_error(run_script("submit_slurm.py", "--gpus_per_node", "4", "--tasks_per_node", "2", "--dry_run",
                                     "--", "main_pretrain.py", *out), "one task per GPU")
    # the script's own flags are checked before anything is queued
    assert_one_line_error(run_script("submit_slurm.py", "--dry_run", "--", "main_pretrain.py", *out, "--epochs",
                                     "three"), "main_pretrain.py: argument --epochs: invalid int value")


def test_launcher_path_problems(tmp_path):
    assert_one_line_error(run_script("submit_slurm.py", "--nodes", "2", "--dry_run", "--", "main_pretrain.py",
                                     "--output_dir", "/tmp/run"), "node-local")
    assert_one_line_error(run_script("submit_slurm.py", "--dry_run", "--", "main_pretrain.py"), "--output_dir")
    assert_one_line_error(run_script("submit_slurm.py", "--dry_run", "--", "train.py", "--output_dir", tmp_path),
                          "script must be one of")
    assert_one_line_error(run_script("submit_slurm.py", "--dry_run", "--", "main_finetune.py", "--output_dir",
                                     tmp_path, "--data_path", "/nonexistent"), "data_path")
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert_one_line_error(run_script("submit_slurm.py", "--dry_run", "--", "main_pretrain.py", "--output_dir",
                                     afile), f"({afile} is a file)")
    assert_one_line_error(run_script("submit_slurm.py", "--gpus_per_node", "0", "--tasks_per_node", "0", "--dry_run",
                                     "--", "main_pretrain.py", "--output_dir", tmp_path), "--tasks_per_node must be")
    if not any(os.access(os.path.join(d, "sbatch"), os.X_OK) for d in os.environ["PATH"].split(os.pathsep)):
        assert_one_line_error(run_script("submit_slurm.py", "--", "main_pretrain.py", "--output_dir", tmp_path),
                              "sbatch not found")


def srun_task_env(rank, **extra):
    """The variables srun gives task `rank` of a 2-task step (no MASTER_ADDR: none is set by srun)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM")}
    env.update(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
               SLURM_LOCALID=str(rank), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def test_ranks_and_master_from_slurm_variables(tmp_path):
    """Two tasks started as `srun -n 2 python main_pretrain.py` would (SLURM_PROCID/NTASKS/
    LOCALID, the step's node list, no MASTER_ADDR) form one gloo job at the first host."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "main_pretrain.py"), *TINY,
                               "--batch_size", "8", "--output_dir", str(tmp_path / "o")], cwd=REPO,
                              env=srun_task_env(rank, SLURM_STEP_NODELIST="localhost,otherhost", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "world size 2" in outs[0][0]
    assert "distributed init rank 0/2 backend gloo" in outs[0][0] and "rank 1/2" in outs[1][0]
    state = torch.load(tmp_path / "o" / "checkpoint-0.pth", weights_only=True)
    assert len(state["rng"]) == 2  # one RNG state per rank


@pytest.mark.parametrize("script", ["main_pretrain.py", "main_linprobe.py", "main_finetune.py"])
def test_srun_tasks_without_a_node_list_fail_at_once(script, tmp_path):
    """The entry points share util/dist.py's init: none trains alone as a world-size-1 run."""
    args = TINY if script == "main_pretrain.py" else ["--model", "vit_tiny_patch16", "--synthetic_size", "8"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *args,
                           "--output_dir", str(tmp_path / "o")], cwd=REPO, env=srun_task_env(0),
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "srun started 2 tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST")
    assert not (tmp_path / "o" / "log.txt").exists()


def test_first_host_of_a_slurm_node_list(monkeypatch):
    from util import dist
    cases = {"node1": "node1", "node[1-2]": "node1", "gpu[003-005,9],cpu1": "gpu003", "a,b[1-2]": "a",
             "rack[2-3]-n[07,09]": "rack2-n07"}
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)  # the parser, without scontrol
    assert {k: dist.first_host(k) for k in cases} == cases
    monkeypatch.undo()
    if shutil.which("scontrol"):  # scontrol show hostnames agrees
        assert {k: dist.first_host(k) for k in cases} == cases


def test_srun_steps_of_one_job_get_a_port_each():
    from util import dist
    ports = []
    for step in ("0", "1", "extern"):  # a task of step 1 ran at step 0's port before
        env = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": step, "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n1"}
        dist._slurm_rendezvous(env)
        ports.append(env["MASTER_PORT"])
    assert ports == ["16234", "17234", "16234"]  # the launchers' rule (util/launch_env.sh)


def test_output_dir_that_is_a_file(tmp_path, tiny_args):
    """A new user's typo: --output_dir names an existing file (or a path below one)."""
    afile = tmp_path / "notes.txt"
    afile.write_text("keep")
    assert_one_line_error(run_script("main_pretrain.py", *tiny_args, "--output_dir", afile),
                          f"--output_dir {afile} is not a folder")
    assert_one_line_error(run_script("main_pretrain.py", *tiny_args, "--output_dir", afile / "run"),
                          f"({afile} is a file)")
    assert afile.read_text() == "keep"


def test_dist_timeout_bounds_the_wait_for_a_missing_rank(tmp_path):
    """Rank 1 never comes (a lost host): rank 0 gives up after --dist_timeout minutes
    instead of torch's default 10 (ours: 30) and exits non-zero."""
    env = srun_task_env(0, SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(free_port()))
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "main_pretrain.py"), *TINY, "--dist_timeout", "0.1",
                           "--output_dir", str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert time.time() - t0 < 120
    assert_one_line_error(proc, "rank 0/2: not all ranks met at localhost:", "within --dist_timeout 0.1 min")
    assert re.search(r"Timed out after [5-9] seconds", proc.stderr), proc.stderr
    assert not (tmp_path / "o" / "log.txt").exists()


def test_dist_timeout_must_be_positive(tmp_path):
    env = srun_task_env(0, SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "main_pretrain.py"), *TINY, "--dist_timeout", "0",
                           "--output_dir", str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert_one_line_error(proc, "--dist_timeout must be a positive number of minutes, got 0")


@pytest.mark.parametrize("addr", ["localhost", "127.0.0.1"])
def test_srun_on_several_nodes_refuses_a_loopback_master(addr, tmp_path):
    """sbatch exports the submitting shell's MASTER_ADDR: a loopback one on 2 nodes would leave
    node 1 waiting on its own host until --dist_timeout; it is one line at once instead."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "main_pretrain.py"), *TINY,
                           "--output_dir", str(tmp_path / "o")], cwd=REPO,
                          env=srun_task_env(1, SLURM_NNODES="2", SLURM_STEP_NUM_NODES="2", MASTER_ADDR=addr,
                                            MASTER_PORT=str(free_port()), SLURM_STEP_NODELIST="node[1-2]"),
                          capture_output=True, text=True, timeout=60)
    assert_one_line_error(proc, f"srun runs on 2 nodes but MASTER_ADDR={addr} is this host's loopback")
