"""Multi-node torchrun on one machine: two agents (--nnodes 2 --nproc_per_node 1)
meet through c10d rendezvous on 127.0.0.1 and train to the same weights as one
agent with 2 processes; the PRETRAIN.md commands (pretrain.sh with NODE_RANK 0
and 1) do the same."""
import os
import subprocess
import sys

import torch

from conftest import REPO, TINY, free_port, run_script

RUN = TINY + ["--batch_size", "8", "--epochs", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)


def finish(procs, timeout=900):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return "".join(o for o, _ in outs)


def final_model(out):
    return torch.load(os.path.join(out, "checkpoint-1.pth"), weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_torchrun_agents_match_one_agent_with_two_processes(tmp_path):
    ref = run_script("main_pretrain.py", *RUN, "--output_dir", tmp_path / "one", torchrun=2, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "mae-two-nodes",
         "--local_addr", "127.0.0.1", os.path.join(REPO, "main_pretrain.py"), *RUN,
         "--output_dir", str(tmp_path / "two")],  # one output_dir: a file system both nodes share
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    stdout = finish(agents)
    assert "world size 2" in stdout
    assert_same_weights(final_model(tmp_path / "one"), final_model(tmp_path / "two"))


def test_pretrain_sh_on_two_nodes_matches_one_node(tmp_path):
    """PRETRAIN.md's multi-node command: the same pretrain.sh on every node, NODE_RANK 0 and 1."""
    def pretrain_sh(out, **topology):
        env = {**ENV, "RECIPE": "umae", "PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1", **topology}
        return subprocess.Popen(["bash", os.path.join(REPO, "pretrain.sh"), *RUN, "--accum_iter", "1",
                                 "--output_dir", str(out)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    finish([pretrain_sh(tmp_path / "one", GPUS_PER_NODE="2", MASTER_PORT=str(free_port()))])
    port = str(free_port())
    nodes = [pretrain_sh(tmp_path / "two", NNODES="2", NODE_RANK=str(rank), GPUS_PER_NODE="1", MASTER_PORT=port)
             for rank in range(2)]
    stdout = finish(nodes)
    assert "world size 2" in stdout and '"reg": "uniformity"' in stdout
    assert_same_weights(final_model(tmp_path / "one"), final_model(tmp_path / "two"))
