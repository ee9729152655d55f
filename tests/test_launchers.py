"""The shipped torchrun launchers run as shipped (2 CPU processes, tiny overrides)."""
import json
import os
import re
import subprocess
import sys

from conftest import REPO, TINY, free_port


def run_sh(script, tmp_path, recipe, *extra):
    # 16 images per update (8 per process x 2): TINY's 64 images hold whole accumulation groups
    env = {**os.environ, "RECIPE": recipe, "GPUS_PER_NODE": "2", "EFF_BATCH": "16", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", os.path.join(REPO, script), *TINY, "--batch_size", "8",
                           "--output_dir", str(tmp_path / recipe), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_pretrain_sh_mmae_large_recipe_runs(tmp_path):
    proc = run_sh("pretrain.sh", tmp_path, "mmae-l")
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads(proc.stdout.split("args: ", 1)[1].splitlines()[0])
    assert args["reg"] == "tcr" and args["lamb"] == 0.01 and args["uniformity_mu"] == 3.0
    assert args["centering"] is False and args["norm_pix_loss"] is True
    assert "world size 2" in proc.stdout and args["mask_ratio"] == 0.75 and args["blr"] == 1.5e-4
    assert os.path.exists(tmp_path / "mmae-l" / "checkpoint-0.pth")


def test_pretrain_sh_unknown_recipe(tmp_path):
    proc = run_sh("pretrain.sh", tmp_path, "simclr")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown RECIPE")


def dry_run(script, nnodes, gpus, recipe, *args, **env):
    """The launcher's plan and torchrun command for NNODES x GPUS_PER_NODE, without GPUs."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("BATCH", "ACCUM", "EFF_BATCH")}
    full_env.update({"RECIPE": recipe, "NNODES": str(nnodes), "NODE_RANK": "1" if nnodes > 1 else "0",
                     "MASTER_ADDR": "node0" if nnodes > 1 else "127.0.0.1", "GPUS_PER_NODE": str(gpus), "PYTHON": sys.executable, "DRY_RUN": "1",
                     "CKPT": "pretrained.pth", **env})
    return subprocess.run(["bash", os.path.join(REPO, script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60)


def planned(proc):
    assert proc.returncode == 0, proc.stderr
    plan, cmd = proc.stdout.splitlines()
    cmd = cmd.split()
    value = {k: cmd[cmd.index(k) + 1] for k in ("--batch_size", "--accum_iter", "--nnodes", "--node_rank",
                                                  "--nproc_per_node", "--master_addr", "--master_port")}
    return plan, value


def test_two_nodes_of_eight_gpus_keep_each_recipes_effective_batch():
    cases = [("pretrain.sh", "mmae", 1024, "64", "1"),     # 8 x 128 on one node
             ("linprobe.sh", "mae", 16384, "512", "2"),    # 8 x 512 x accum 4 on one node
             ("linprobe.sh", "mmae", 8192, "256", "2"),
             ("finetune.sh", "mmae-l", 2048, "32", "4"),     # ViT-L: 32 per GPU, as MAE
             ("finetune.sh", "mae-h", 1024, "16", "4"),      # ViT-H: 16 per GPU
             ("finetune.sh", "mae", 1024, "64", "1")]
    for script, recipe, eff, batch, accum in cases:
        plan, value = planned(dry_run(script, 2, 8, recipe))
        assert value["--batch_size"] == batch and value["--accum_iter"] == accum, (script, recipe, value)
        assert int(batch) * 16 * int(accum) == eff
        assert plan.startswith(f"effective batch {eff} = {batch} per GPU x 16 GPUs (2 nodes x 8) x accum {accum}")
        assert value["--nnodes"] == "2" and value["--node_rank"] == "1" and value["--master_addr"] == "node0"
    plan, value = planned(dry_run("pretrain.sh", 1, 1, "mae"))  # one GPU: accumulate
    assert (value["--batch_size"], value["--accum_iter"]) == ("128", "8"), plan


def test_effective_batch_that_cannot_be_kept_is_refused():
    proc = dry_run("pretrain.sh", 2, 3, "mae")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: effective batch 1024 is not a multiple of 6 GPUs") and "BATCH" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    proc = dry_run("pretrain.sh", 2, 8, "mae", BATCH="48")
    assert proc.returncode == 2 and proc.stderr.startswith("error: BATCH=48 x 16 GPUs x ACCUM=1 is not")
    plan, value = planned(dry_run("pretrain.sh", 2, 8, "mae", BATCH="32"))  # kept by accumulating
    assert (value["--batch_size"], value["--accum_iter"]) == ("32", "2"), plan


def test_batch_arguments_to_a_launcher_keep_the_effective_batch():
    """`bash finetune.sh --batch_size 32` wins over the preset's per-GPU batch (it comes last),
    so the plan takes it and accumulates to the recipe's effective batch; before, the plan
    printed 128 x 8 x 1 while the run trained 32 x 8 x 1 = 256."""
    plan, value = planned(dry_run("finetune.sh", 1, 8, "mae", "--batch_size", "32"))
    assert (value["--batch_size"], value["--accum_iter"]) == ("32", "4"), plan
    assert plan.startswith("effective batch 1024 = 32 per GPU x 8 GPUs (1 nodes x 8) x accum 4"), plan
    plan, value = planned(dry_run("linprobe.sh", 1, 8, "mae", "--accum_iter=8", "--epochs", "1"))
    assert (value["--batch_size"], value["--accum_iter"]) == ("256", "8"), plan
    plan, value = planned(dry_run("pretrain.sh", 1, 2, "mae", "--batch_size", "16", "--batch_size", "64"))
    assert (value["--batch_size"], value["--accum_iter"]) == ("64", "8"), plan  # the last one wins, as in argparse
    for args, env, fragment in [(["--batch_size", "48"], {}, "error: BATCH=48 x 8 GPUs x ACCUM=2 is not"),
                                (["--batch_size", "64"], {"BATCH": "32"}, "error: BATCH=32 and --batch_size 64 disagree"),
                                (["--accum_iter", "two"], {}, "error: --accum_iter two: a positive integer")]:
        proc = dry_run("finetune.sh", 1, 8, "mae", *args, **env)
        assert proc.returncode == 2 and proc.stderr.startswith(fragment), proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""
    plan, value = planned(dry_run("finetune.sh", 1, 1, "mae-h"))  # one GPU: ViT-H at 16 per GPU
    assert (value["--batch_size"], value["--accum_iter"]) == ("16", "64"), plan


def test_several_nodes_need_a_master_address_that_is_not_loopback():
    for addr in ("", "127.0.0.1", "localhost"):
        proc = dry_run("pretrain.sh", 2, 1, "mae", MASTER_ADDR=addr)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: NNODES=2 needs MASTER_ADDR")


def in_srun_step(job, step, nodes, tasks, node_id, **env):
    """pretrain.sh as srun starts it inside allocation `job` (DRY_RUN), with `env` inherited."""
    slurm = {"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step), "SLURM_STEP_NUM_NODES": str(nodes),
             "SLURM_NNODES": str(nodes), "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_NODEID": str(node_id),
             "SLURM_STEP_NODELIST": "nodeA,nodeB", "SLURM_JOB_NODELIST": "nodeA,nodeB"}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK"))}
    full_env.update({"RECIPE": "mae", "GPUS_PER_NODE": "1", "PYTHON": sys.executable, "DRY_RUN": "1",
                     **slurm, **env})
    return subprocess.run(["bash", os.path.join(REPO, "pretrain.sh")], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_slurm_steps_get_their_own_port_and_slurms_topology():
    # single-node jobs and steps: a port of their own (all shared 29500 before)
    ports = set()
    for job, step in ((1234, 0), (1235, 0), (1234, 1)):
        plan, value = planned(in_srun_step(job, step, 1, 1, 0))
        ports.add(plan.split("rendezvous at 127.0.0.1:")[1].split(",")[0])
    assert ports == {"16234", "16235", "17234"}
    # one launcher per node on a single node too (8 launchers of 8 processes each before)
    proc = in_srun_step(1234, 0, 1, 8, 0)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "error: srun started 8 tasks on 1 nodes: run pretrain.sh once per node " \
                                  "(srun --ntasks-per-node=1)"
    # an exported NODE_RANK / NNODES from the submitting shell: SLURM's win, said in one note
    proc = in_srun_step(1234, 0, 2, 2, 1, NODE_RANK="0", NNODES="2", MASTER_ADDR="nodeA")  # no scontrol here
    plan, value = planned(proc)
    assert value["--node_rank"] == "1" and value["--master_addr"] == "nodeA" and "this is node 1" in plan
    assert proc.stderr.strip() == "note: NODE_RANK=0 from the environment ignored: srun says NODE_RANK=1"


def test_inherited_master_address_and_port_in_an_srun_step_are_named(tmp_path):
    # sbatch exports the submitting shell's MASTER_ADDR/MASTER_PORT: they are kept (a fast
    # interface's name, a port the firewall opens) but a stale one is named, not silent
    (tmp_path / "scontrol").write_text("#!/bin/sh\nprintf 'nodeA\\nnodeB\\n'\n")
    (tmp_path / "scontrol").chmod(0o755)
    path = f"{tmp_path}:{os.environ['PATH']}"
    proc = in_srun_step(1234, 2, 2, 2, 1, MASTER_ADDR="oldnode", MASTER_PORT="29500", PATH=path)
    plan, value = planned(proc)
    assert value["--master_addr"] == "oldnode" and value["--master_port"] == "29500"
    assert proc.stderr.splitlines() == [
        "note: MASTER_ADDR=oldnode from the environment kept: node 0 of this step is nodeA",
        "note: MASTER_PORT=29500 from the environment kept: unset it for this job's own port 18234 "
        "(jobs sharing a node and a port collide)"]
    proc = in_srun_step(1234, 2, 2, 2, 1, PATH=path)  # nothing inherited: SLURM's, silently
    plan, value = planned(proc)
    assert (value["--master_addr"], value["--master_port"], proc.stderr) == ("nodeA", "18234", "")
    # one node (sbatch pretrain.sh): an inherited address would send torchrun to another host
    proc = in_srun_step(1234, 0, 1, 1, 0, MASTER_ADDR="oldnode", PATH=path)
    plan, value = planned(proc)
    assert value["--master_addr"] == "127.0.0.1"
    assert proc.stderr.strip() == "note: MASTER_ADDR=oldnode from the environment ignored: one node meets on 127.0.0.1"
    # the batch script of a 2-node job with NNODES=1 inherited: it would leave a node idle unsaid
    proc = dry_run("pretrain.sh", 1, 1, "mae", SLURM_JOB_ID="1234", SLURM_NNODES="2")
    planned(proc)
    assert proc.stderr.strip() == "note: NNODES=1 in an allocation of 2 nodes: this runs on this node only " \
                                  "(srun --ntasks-per-node=1 bash pretrain.sh ... uses them all)"


def test_sigusr1_to_the_launcher_reaches_the_workers_through_torchrun(tmp_path):
    """SLURM's time-limit warning (--signal=USR1@T) sent to pretrain.sh: the workers save a
    checkpoint at their next poll and the launcher exits 0 (before: torchrun died of the
    signal, exit 138, and the workers never saw it)."""
    import signal
    import time
    out = tmp_path / "usr1"
    env = {**os.environ, "RECIPE": "mae", "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "EFF_BATCH": "16"}
    env.pop("SLURM_JOB_ID", None)
    args = [*TINY, "--synthetic_size", "4000", "--epochs", "50", "--batch_size", "8", "--output_dir", str(out)]
    proc = subprocess.Popen(["bash", os.path.join(REPO, "pretrain.sh"), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log = []
        for line in proc.stdout:  # until training has started on both ranks
            log.append(line)
            if "Epoch: [0] [" in line:
                break
        time.sleep(1)
        proc.send_signal(signal.SIGUSR1)  # the launcher's bash only, as srun's task
        rest, _ = proc.communicate(timeout=120)
        log = "".join(log) + rest
        assert proc.returncode == 0, log[-3000:]
        assert "preempted at epoch 0" in log, log[-3000:]
        assert any(p.name.startswith("checkpoint") for p in out.iterdir()), log[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigusr1_to_the_launcher_before_the_workers_exist_is_not_lost(tmp_path):
    """The warning 0.3 s after the launch: torchrun is still importing and its workers do not
    exist yet (before: the forward found no process, and the run trained on to its end)."""
    import signal
    import time
    out = tmp_path / "early"
    env = {**os.environ, "RECIPE": "mae", "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "EFF_BATCH": "16"}
    env.pop("SLURM_JOB_ID", None)
    args = [*TINY, "--synthetic_size", "4000", "--epochs", "50", "--batch_size", "8", "--output_dir", str(out)]
    proc = subprocess.Popen(["bash", os.path.join(REPO, "pretrain.sh"), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
        assert re.search(r"preempted at epoch 0 step \d+: checkpoint saved", log), log[-3000:]
        assert any(p.name.startswith("checkpoint") for p in out.iterdir()), log[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
