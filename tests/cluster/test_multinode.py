"""Multi-node torchrun across separate hosts (tests/cluster/hosts.py: node1 and node2,
each its own network namespace, address and host name; one shared file system), no
SLURM: two agents (--nnodes 2 --nproc_per_node 1) meet through c10d rendezvous at
node1 and train to the same weights as one agent with 2 processes on one host; the
PRETRAIN.md commands (pretrain.sh with NODE_RANK 0 and 1, MASTER_ADDR=node1) do the same."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from conftest import REPO, TINY
from hosts import Hosts, cannot_create_namespaces
from slurm_cluster import SHARED, job_env

# pretrain.sh's RECIPE=mae flags, so that every run here trains the same thing
RUN = TINY + ["--batch_size", "8", "--epochs", "2", "--blr", "1.5e-4", "--weight_decay", "0.05",
              "--mask_ratio", "0.75", "--norm_pix_loss", "--reg", "none"]
ENV = job_env()


@pytest.fixture(scope="module")
def hosts():
    why = cannot_create_namespaces()
    if why:
        pytest.skip(f"separate hosts: {why}")
    h = Hosts(["node1", "node2"], tag=f"t{os.getpid()}")
    os.makedirs(SHARED, exist_ok=True)
    h.shared = tempfile.mkdtemp(prefix="multinode-", dir=SHARED)
    try:
        h.start()
        yield h
    finally:
        h.stop()
        if not os.environ.get("CLUSTER_KEEP"):
            shutil.rmtree(h.shared, ignore_errors=True)
            try:
                os.rmdir(SHARED)  # when no other run is in it
            except OSError:
                pass


def launch(hosts, host, *cmd, **env):
    return subprocess.Popen(hosts.on(host, *cmd), cwd=REPO, env={**ENV, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


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


def assert_one_rank_per_host(stdout):
    assert "world size 2" in stdout
    assert re.search(r"distributed init rank 0/2 backend gloo on node1\b", stdout), stdout
    assert re.search(r"distributed init rank 1/2 backend gloo on node2\b", stdout), stdout


@pytest.fixture(scope="module")
def one_host(hosts):
    out = os.path.join(hosts.shared, "one")
    stdout = finish([launch(hosts, "node1", sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", "2", "main_pretrain.py", *RUN, "--output_dir", out)])
    assert re.search(r"rank 1/2 backend gloo on node1\b", stdout), stdout
    return final_model(out)


def test_torchrun_c10d_across_two_hosts_matches_one_host(hosts, one_host):
    out = os.path.join(hosts.shared, "c10d")  # one output_dir: the file system both hosts share
    agents = [launch(hosts, h, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                     "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node1:29400",
                     "--rdzv_id", "mae-two-hosts", "main_pretrain.py", *RUN, "--output_dir", out)
              for h in ("node2", "node1")]  # the agent away from the endpoint may start first
    assert_one_rank_per_host(finish(agents))
    assert_same_weights(one_host, final_model(out))


def test_pretrain_sh_on_two_hosts_matches_one_host(hosts, one_host):
    """PRETRAIN.md's multi-node command: the same pretrain.sh on every host, NODE_RANK 0
    and 1, MASTER_ADDR = node 0's name; the effective batch planned for 2 x 1 GPUs."""
    out = os.path.join(hosts.shared, "pretrain_sh")
    topology = {"RECIPE": "mae", "PYTHON": sys.executable, "NNODES": "2", "GPUS_PER_NODE": "1",
                "MASTER_ADDR": "node1", "MASTER_PORT": "29500", "EFF_BATCH": "16"}
    nodes = [launch(hosts, h, "bash", os.path.join(REPO, "pretrain.sh"), *RUN, "--output_dir", out,
                    NODE_RANK=str(rank), **topology) for rank, h in enumerate(("node1", "node2"))]
    stdout = finish(nodes)
    assert stdout.count("effective batch 16 = 8 per GPU x 2 GPUs (2 nodes x 1) x accum 1; "
                        "torchrun rendezvous at node1:29500") == 2, stdout
    assert_one_rank_per_host(stdout)
    assert_same_weights(one_host, final_model(out))
