"""The shipped torchrun launchers run as shipped (2 CPU processes, tiny overrides)."""
import json
import os
import subprocess
import sys

from conftest import REPO, TINY, free_port


def run_sh(script, tmp_path, recipe, *extra):
    env = {**os.environ, "RECIPE": recipe, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
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
