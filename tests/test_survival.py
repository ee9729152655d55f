"""Surviving kills: auto-resume, crash-safe checkpoints, exact continuation,
preemption, non-finite retries and safe loading."""
import datetime
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, assert_one_line_error, free_port, run_script
from util.checkpoint import list_checkpoints

# 2 epochs x 4 steps, a checkpoint after every step.
RUN = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--batch_size", "16",
       "--synthetic_size", "64", "--num_workers", "1", "--epochs", "2", "--warmup_epochs", "1",
       "--print_freq", "2", "--val_interval", "0", "--vis_every", "0", "--save_every_steps", "1",
       "--reg", "tcr", "--lamb", "0.1", "--keep_last", "3"]


# The same for the linear probe and fine-tuning (random encoder: no --finetune needed).
EVAL_RUN = ["--model", "vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--batch_size", "16",
            "--synthetic_size", "64", "--num_workers", "1", "--epochs", "2", "--warmup_epochs", "1",
            "--print_freq", "2", "--save_every_steps", "1", "--keep_last", "3"]


def launch(out, *extra, torchrun=0, script="main_pretrain.py", base=RUN, before=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [os.path.join(REPO, script), *before, *base, "--output_dir", str(out), *map(str, extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def position(out):
    """(epoch, step) the newest checkpoint continues from, or None."""
    found = list_checkpoints(str(out))
    if not found:
        return None
    _, epoch, step = found[0]
    return (epoch + 1, 0) if step is None else (epoch, step)


def wait_for_position(proc, out, at_least, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        pos = position(out)
        if pos is not None and pos >= at_least:
            return pos
        if proc.poll() is not None:
            return position(out)
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


def kill_group(proc, sig):
    os.killpg(proc.pid, sig)
    proc.communicate(timeout=120)


def final_model(out):
    return torch.load(os.path.join(out, "checkpoint-1.pth"), weights_only=True)["model"]


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: the CPU ops here are deterministic


def test_sigkill_at_random_steps_then_relaunch_matches_uninterrupted(tmp_path):
    ref = launch(tmp_path / "ref")
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]
    out = tmp_path / "killed"
    rng = random.Random(1234)
    targets = sorted(rng.sample([(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)], 2))
    for target in targets:
        proc = launch(out)
        wait_for_position(proc, out, target)
        kill_group(proc, signal.SIGKILL)
    proc = launch(out)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "resumed from" in stdout
    assert_same_weights(final_model(tmp_path / "ref"), final_model(out))
    assert not [f for f in os.listdir(out) if ".tmp." in f]


def test_requeued_resume_job_continues_from_its_own_checkpoints(tmp_path):
    """A job started with --resume X and requeued (the same command again) continues from
    the newest checkpoint it wrote in --output_dir, not from X: killed twice, it ends at
    the uninterrupted run's weights having redone no step."""
    seed = launch(tmp_path / "seed", "--epochs", "1", "--save_every_steps", "0")
    _, err = seed.communicate(timeout=600)
    assert seed.returncode == 0, err[-2000:]
    start = tmp_path / "seed" / "checkpoint-0.pth"
    ref = launch(tmp_path / "ref", "--resume", start)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]
    out = tmp_path / "job"
    for target in [(1, 1), (1, 3)]:
        proc = launch(out, "--resume", start)
        seen = wait_for_position(proc, out, target)
        kill_group(proc, signal.SIGKILL)
    proc = launch(out, "--resume", start)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert f"--resume {start} started this run; continuing from its newest checkpoint" in stdout
    assert f"starting at epoch {seen[0]} step {seen[1]}" in stdout
    assert_same_weights(final_model(tmp_path / "ref"), final_model(out))
    # another --resume into that folder is a new run: it starts from the file it names
    proc = launch(out, "--resume", tmp_path / "ref" / "checkpoint-1.pth", "--epochs", "3")
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "resumed from " + str(tmp_path / "ref" / "checkpoint-1.pth") in stdout


def test_resume_into_a_folder_with_checkpoints_further_on_is_refused(tmp_path):
    """--resume X --output_dir D where D holds another run's checkpoints past X: before,
    the requeued job went back to X each time (D's newest was not this run's) and
    --keep_last deleted X and this run's own files. Resuming D's newest in place (MAE's way)
    still works."""
    out = tmp_path / "run"
    proc = launch(out, "--save_every_steps", "0", "--save_every", "1")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    before = sorted(os.listdir(out))
    assert {"checkpoint-0.pth", "checkpoint-1.pth"} <= set(before)
    for start in (out / "checkpoint-0.pth", tmp_path / "elsewhere.pth"):  # in D, and a copy outside it
        shutil.copy(out / "checkpoint-0.pth", tmp_path / "elsewhere.pth")
        proc = launch(out, "--resume", start)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode != 0 and err.strip().splitlines() == [
            f"error: --resume {start}: --output_dir {out} already holds checkpoint-1.pth, further on, of another "
            "run: this run's checkpoints would mix with its and --keep_last would delete them; choose another "
            "--output_dir (nothing was changed)"], err
        assert sorted(os.listdir(out)) == before
    proc = launch(out, "--resume", out / "checkpoint-1.pth", "--epochs", "3", "--save_every_steps", "0")
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "starting at epoch 2 step 0" in stdout, err[-2000:]
    assert position(out) == (3, 0)


def test_truncated_newest_checkpoint_falls_back(tmp_path):
    out = tmp_path / "run"
    proc = launch(out, "--epochs", "1")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    newest = list_checkpoints(str(out))[0][0]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    proc = launch(out, "--epochs", "2")
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "skipping unreadable checkpoint" in stdout and "truncated or corrupt" in stdout
    assert "checkpoint-0-step3.pth; starting at epoch 0 step 3" in stdout


def test_sigterm_saves_and_exits_zero_then_continues(tmp_path):
    out = tmp_path / "run"
    proc = launch(out)
    seen = wait_for_position(proc, out, (0, 1))
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted" in stdout
    assert position(out) > seen
    proc = launch(out)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "resumed from" in stdout, err[-2000:]
    assert position(out) == (2, 0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_every_process_with_loader_workers_saves_and_exits_zero(tmp_path, sig):
    # SLURM signals every process of the step, the loader workers too: they must live on
    # until the main process has written its checkpoint (torch's worker handler dies of
    # a SIGTERM not sent by its parent, and SIGUSR1's default is to die).
    out = tmp_path / "run"
    proc = launch(out, "--num_workers", "2")
    seen = wait_for_position(proc, out, (0, 1))
    os.killpg(proc.pid, sig)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted" in stdout and "Traceback" not in err
    assert position(out) > seen
    proc = launch(out, "--num_workers", "2")
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "resumed from" in stdout, err[-2000:]
    assert position(out) == (2, 0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_the_imports_saves_at_the_first_poll(tmp_path, sig):
    # 1 s in, the run is importing torch (seconds): the handlers used to come after that,
    # and the signal's default action killed it with nothing saved
    out = tmp_path / "run"
    proc = launch(out)
    time.sleep(1.0)
    proc.send_signal(sig)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted at epoch 0 step 1: checkpoint saved" in stdout and position(out) == (0, 1)


def _worker_that_sleeps(init, ready):
    init(0)
    ready.set()
    time.sleep(120)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="Linux only, as the handler")
def test_loader_worker_ignores_others_signals_but_not_its_parents_terminate():
    import multiprocessing
    from util.preempt import LoaderWorkerSignals
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_worker_that_sleeps, args=(LoaderWorkerSignals(), ready), daemon=True)
    worker.start()
    assert ready.wait(30)
    for sig in ("TERM", "USR1"):  # sent by another process, as slurmstepd's
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive()
    worker.terminate()  # what the loader's shutdown and multiprocessing's atexit send
    worker.join(10)
    assert worker.exitcode == 0


def test_nonfinite_loss_retry_skips_the_batch(tmp_path, tiny_args):
    out = str(tmp_path / "nan")
    proc = run_script("tests/inject_nonfinite.py", "5", "main_pretrain.py", *tiny_args, "--epochs", "2",
                      "--output_dir", out, "--nan_retries", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "non-finite loss at epoch 1 step 1" in proc.stdout
    assert "skipping epoch 1 step 1" in proc.stdout
    state = torch.load(os.path.join(out, "checkpoint-1.pth"), weights_only=True)
    assert state["skip_steps"] == [[1, 1]]  # plain lists, in the checkpoint (not on args)
    assert "skip_steps" not in state["args"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_pickled_checkpoint_is_refused(tmp_path, tiny_args):
    bad = tmp_path / "pickled.pth"
    # (an argparse.Namespace, as official checkpoints hold, is the one object allowed)
    torch.save({"model": {}, "args": {"model": "x"}, "when": datetime.date(2024, 1, 1)}, bad)
    proc = run_script("main_pretrain.py", *tiny_args, "--resume", bad, "--output_dir", tmp_path / "o")
    assert_one_line_error(proc, "pickled objects", "weights_only")


def test_two_process_run_killed_and_relaunched_with_torchrun(tmp_path):
    ref = launch(tmp_path / "ref", "--batch_size", "8", torchrun=2)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    out = tmp_path / "killed"
    proc = launch(out, "--batch_size", "8", torchrun=2)
    wait_for_position(proc, out, (0, 3))
    kill_group(proc, signal.SIGKILL)
    proc = launch(out, "--batch_size", "8", torchrun=2)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in stdout
    assert_same_weights(final_model(tmp_path / "ref"), final_model(out))


def test_linprobe_killed_and_preempted_continues_exactly(tmp_path):
    kw = dict(script="main_linprobe.py", base=EVAL_RUN)
    ref = launch(tmp_path / "ref", **kw)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]
    out = tmp_path / "run"
    proc = launch(out, **kw)
    wait_for_position(proc, out, (0, 2))
    kill_group(proc, signal.SIGKILL)
    proc = launch(out, **kw)
    seen = wait_for_position(proc, out, (1, 1))
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "preempted" in stdout, err[-2000:]
    assert position(out) > seen
    proc = launch(out, **kw)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "resumed from" in stdout, err[-2000:]
    assert_same_weights(final_model(tmp_path / "ref"), final_model(out))


def test_finetune_nonfinite_retry(tmp_path):
    out = tmp_path / "ft"
    proc = launch(out, "--nan_retries", "1", script="tests/inject_nonfinite.py",
                  before=["5", "main_finetune.py"], base=EVAL_RUN)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "non-finite loss at epoch 1 step 1" in stdout and "skipping epoch 1 step 1" in stdout


@pytest.mark.parametrize("engine,accum_reg,skips,steps", [
    ("pretrain", "micro", "1", 2), ("pretrain", "exact", "1", 2), ("pretrain", "micro", "2,3", 1),
    ("finetune", "-", "1", 2), ("finetune", "-", "2,3", 1)])
def test_skipped_group_end_keeps_ddp_replicas_equal(tmp_path, engine, accum_reg, skips, steps):
    """A skipped last micro-step of a group: the group's last step that runs all-reduces,
    so both ranks step on the same gradient (a fully skipped group steps on neither), in
    pretraining and in the fine-tune/linear-probe loop."""
    out = tmp_path / "res.json"
    proc = run_script("tests/skip_group_end_worker.py", engine, accum_reg, skips, out, torchrun=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["moved"] > 1e-4 and res["steps"] == steps
    assert res["max_diff_across_ranks"] == 0.0


def test_rank0_chooses_the_checkpoint_every_rank_resumes_from(tmp_path):
    for rank, epochs in ((0, [0]), (1, [0, 1])):  # rank 1 sees a newer file than rank 0
        (tmp_path / f"rank{rank}").mkdir()
        for e in epochs:
            torch.save({"epoch": e}, tmp_path / f"rank{rank}" / f"checkpoint-{e}.pth")
    torch.save({"acc1": 90.0}, tmp_path / "rank1" / "checkpoint-best.pth")  # rank 0 sees none yet
    out = tmp_path / "chosen.json"
    proc = run_script("tests/resume_choice_worker.py", tmp_path, out, torchrun=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = str(tmp_path / "rank0" / "checkpoint-0.pth")
    # every rank takes rank 0's view, so all of them run (or skip) the same best-checkpoint save
    assert json.loads(out.read_text()) == [[want, 0, want, -1.0], [want, 0, want, -1.0]]


def test_checkpoints_load_memory_mapped_and_round_trip(tmp_path, monkeypatch):
    """Resume maps the file (tensors read as used, not the whole file into each rank's RAM),
    loads the same values, and training on them never writes into the checkpoint."""
    from util.checkpoint import load_checkpoint
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = str(tmp_path / "checkpoint-0.pth")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}, path)
    on_disk = open(path, "rb").read()
    state = load_checkpoint(path)
    assert path in open("/proc/self/maps").read()  # mapped, not read
    assert state["epoch"] == 0 and all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    again = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(again.parameters(), lr=0.1)
    again.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])  # CPU state may stay backed by the mapped file
    again(torch.randn(2, 4)).sum().backward()
    opt2.step()
    assert open(path, "rb").read() == on_disk  # copy-on-write: the checkpoint is untouched
    # a file system that cannot map files falls back to a plain load
    plain = torch.load

    def no_mmap(*a, mmap=None, **k):
        if mmap:
            raise RuntimeError("mmap not supported")
        return plain(*a, **k)

    monkeypatch.setattr(torch, "load", no_mmap)
    assert torch.equal(load_checkpoint(path)["model"]["weight"], model.weight.detach())


# ---- resume on another number of processes ------------------------------------------------------
# effective batch 16 = 8 x accum 1 x 2 processes = 8 x accum 2 x 1 process; 79 images (a prime: neither
# 8 nor 16 divides it) make 4 updates per epoch at both (the 15 left over each epoch are dropped; a short
# fifth group of 8 at one process would make the runs differ)
WORLD_RUN = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--batch_size", "8",
             "--synthetic_size", "79", "--num_workers", "0", "--epochs", "2", "--warmup_epochs", "1",
             "--print_freq", "2", "--val_interval", "0", "--vis_every", "0", "--save_every_steps", "2",
             "--keep_last", "20", "--reg", "tcr", "--lamb", "0.1", "--blr", "1e-3"]
ON = {2: ["--accum_iter", "1"], 1: ["--accum_iter", "2"]}


def pretrain(out, world, *extra):
    proc = run_script("main_pretrain.py", *WORLD_RUN, *ON[world], "--output_dir", out, *extra, torchrun=world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_close_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, (a[k] - b[k]).abs().max().item())


def epoch_log(out, epoch):
    with open(os.path.join(out, "log.txt")) as f:
        return next(r for r in map(json.loads, f) if r["epoch"] == epoch)


def assert_close_train_log(a, b):
    keys = [k for k in b if k.startswith("train_") and "per_s" not in k]
    assert {"train_loss", "train_loss_reg", "train_lr"} <= set(keys)
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-4), (k, a[k], b[k])


def test_resume_on_another_world_size_matches_uninterrupted(tmp_path):
    """Stopped mid-epoch at 2 processes, resumed at 1 x accum 2 (and 1 -> 2): the same samples,
    crops and masks, the same weights up to float reduction order, as the uninterrupted runs."""
    full = {w: tmp_path / f"full{w}" for w in (1, 2)}
    for w in (1, 2):
        pretrain(full[w], w)
    cuts = {(2, 1): "checkpoint-0-step2.pth", (1, 2): "checkpoint-0-step6.pth"}  # samples 32 and 48 of 79
    for (w, w2), name in cuts.items():
        cut = tmp_path / f"cut{w}to{w2}"
        cut.mkdir()
        shutil.copy(full[w] / name, cut / name)
        proc = pretrain(cut, w2)
        step = {(2, 1): 4, (1, 2): 3}[(w, w2)]
        assert f"starting at epoch 0 step {step}" in proc.stdout
        assert_close_weights(final_model(cut), final_model(full[w]))
        assert_close_weights(final_model(cut), final_model(full[w2]))
        # the resumed epoch's logged averages count every rank's steps before the cut once
        # (rank 0's sums alone were saved, and restored on every rank)
        assert_close_train_log(epoch_log(cut, 0), epoch_log(full[w], 0))
    # the runs at 1 and 2 processes saw the same samples and masks in the same updates
    assert_close_weights(final_model(full[1]), final_model(full[2]))


def test_resume_with_another_effective_batch_is_refused(tmp_path):
    out = tmp_path / "run"
    pretrain(out, 2, "--epochs", "1")
    before = {p: digest(p) for p, _, _ in list_checkpoints(str(out))}
    proc = run_script("main_pretrain.py", *WORLD_RUN, "--accum_iter", "1", "--output_dir", out)  # 8 x 1 x 1
    assert_one_line_error(proc, "effective batch 16", "this run's is 8", "--accum_iter 2")
    assert {p: digest(p) for p, _, _ in list_checkpoints(str(out))} == before


def test_two_process_nonfinite_retry_at_a_group_end(tmp_path):
    """torchrun, 2 processes x accum 2 (--accum_reg micro): a NaN at epoch 1 step 1, the last
    micro-step of a group, is retried from rank 0's choice of checkpoint and stepped over."""
    out = tmp_path / "nan"
    proc = run_script("tests/inject_nonfinite.py", "5", "main_pretrain.py", *WORLD_RUN, "--accum_iter", "2",
                      "--accum_reg", "micro", "--nan_retries", "1", "--output_dir", out, torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss at epoch 1 step 1" in proc.stdout and "skipping epoch 1 step 1" in proc.stdout
    state = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert state["skip_steps"] == [[1, 1]] and state["effective_batch"] == 32
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL])
def test_a_rank_that_freezes_or_dies_ends_the_others_with_one_line(tmp_path, sig):
    """Two ranks as srun starts them (no torchrun to tear the others down); rank 1 is
    stopped (its host froze: the connection stays open, nothing arrives) or killed mid-run.
    Rank 0 ends within --dist_timeout (0.25 min here) with one line naming the wait, and
    the newest checkpoint still loads."""
    port, procs = str(free_port()), []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "main_pretrain.py"), *RUN, "--synthetic_size", "1024",
             "--batch_size", "8", "--num_workers", "0", "--dist_timeout", "0.25", "--output_dir", str(tmp_path)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        assert wait_for_position(procs[0], tmp_path, (0, 1)) >= (0, 1)
        os.kill(procs[1].pid, sig)
        t0 = time.time()
        out, err = procs[0].communicate(timeout=120)
        waited = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    if sig == signal.SIGSTOP:
        assert lines[0].startswith("error: rank 0: a collective ") and " waited 15 s (--dist_timeout) " in lines[0]
        assert 14 < waited < 60, waited
    else:
        assert lines[0].startswith("error: rank 0: another rank went away mid-collective (gloo: Connection ")
        assert waited < 30, waited
    assert "a requeued or restarted run resumes from it" in lines[0]
    newest = list_checkpoints(str(tmp_path))[0][0]
    assert torch.load(newest, weights_only=True)["model"]
