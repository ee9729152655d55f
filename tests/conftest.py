import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# A pretraining small enough for CPU tests: ViT-Tiny width, 32x32 images, 4x4 patches.
TINY = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4",
        "--batch_size", "16", "--synthetic_size", "64", "--num_workers", "0", "--epochs", "1",
        "--warmup_epochs", "1", "--print_freq", "2", "--val_interval", "0", "--vis_every", "0"]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (benchmarks/gpu_acceptance.py runs them)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, *args, timeout=600, env=None, torchrun=0, preexec_fn=None):
    """Run a repository script as a user would; returns the CompletedProcess. preexec_fn runs
    in the child before the script (e.g. a lower resource limit)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [os.path.join(REPO, script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in err[0], err[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def run_and_resume_after_epoch0(tmp_path, args):
    """main_pretrain with `args` (2 epochs, --save_every 1) in one go (in tmp_path/full), and
    again stopped after epoch 0 and relaunched (tmp_path/cut); returns both final checkpoints."""
    import shutil
    import torch
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = run_script("main_pretrain.py", *args, "--output_dir", full)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cut.mkdir()
    shutil.copy(full / "checkpoint-0.pth", cut / "checkpoint-0.pth")
    proc = run_script("main_pretrain.py", *args, "--output_dir", cut)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "starting at epoch 1" in proc.stdout
    return [torch.load(d / "checkpoint-1.pth", weights_only=True) for d in (full, cut)]


@pytest.fixture
def tiny_args():
    return list(TINY)
