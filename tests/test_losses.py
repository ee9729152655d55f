import json

import numpy as np
import pytest
import torch

from conftest import run_script
from loss_func import regularizer_loss, uniformity_loss, uniformity_loss_TCR


def ref_uniformity(x):
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.mean((z @ z.T) ** 2)


def ref_tcr(x, mu=1.0, centering=False):
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    m, d = z.shape
    cov = z.T @ (np.eye(m) - np.ones((m, m)) / m) @ z if centering else z.T @ z
    sign, logdet = np.linalg.slogdet(np.eye(d) + mu / d * cov)
    assert sign > 0
    return -logdet


@pytest.mark.parametrize("m,d", [(16, 8), (8, 16), (12, 12)])  # both Gram forms
def test_regularisers_match_independent_formulas(m, d):
    x = np.random.default_rng(0).normal(size=(m, d))
    t = torch.from_numpy(x)
    assert uniformity_loss(t).item() == pytest.approx(ref_uniformity(x), rel=1e-10)
    for mu in (1.0, 3.0):
        for centering in (False, True):
            got = uniformity_loss_TCR(t, mu, centering).item()
            assert got == pytest.approx(ref_tcr(x, mu, centering), rel=1e-9, abs=1e-12)


def test_regularisers_are_float32_under_autocast_and_scale_invariant():
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = uniformity_loss(x.bfloat16())
        t = uniformity_loss_TCR(x.bfloat16())
    assert u.dtype == torch.float32 and t.dtype == torch.float32
    # rows are normalised: scaling a row changes nothing
    y = x * torch.rand(32, 1) * 10
    assert torch.allclose(uniformity_loss(x), uniformity_loss(y), atol=1e-6)
    assert torch.allclose(uniformity_loss_TCR(x), uniformity_loss_TCR(y), atol=1e-5)
    assert regularizer_loss(x, "none").item() == 0.0


def test_gradcheck_float64():
    for m, d in ((6, 4), (4, 6)):
        x = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(uniformity_loss, (x,))
        assert torch.autograd.gradcheck(lambda a: uniformity_loss_TCR(a, 2.0, False), (x,))
        assert torch.autograd.gradcheck(lambda a: uniformity_loss_TCR(a, 1.0, True), (x,))


def test_collapsed_features_score_worse():
    spread = torch.eye(8)                                  # orthogonal directions
    collapsed = torch.ones(8, 8) + 1e-3 * torch.randn(8, 8)  # one direction
    assert uniformity_loss(spread) < uniformity_loss(collapsed)
    assert uniformity_loss_TCR(spread) < uniformity_loss_TCR(collapsed)


def test_world_size_invariance_two_gloo_processes(tmp_path):
    """2 ranks x batch 4 (DDP) == 1 process x batch 8: losses and averaged gradients."""
    out = tmp_path / "dist.json"
    for world in (1, 2):
        proc = run_script("tests/dist_invariance_worker.py", str(out) + f".{world}", torchrun=world,
                          timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    one = json.load(open(str(out) + ".1"))
    two = json.load(open(str(out) + ".2"))
    for reg in ("uniformity", "tcr", "tcr_centered"):
        a, b = one[reg], two[reg]
        assert a["reg"] == pytest.approx(b["reg"], rel=1e-5, abs=1e-6), reg
        assert a["total"] == pytest.approx(b["total"], rel=1e-5), reg
        ga, gb = np.array(a["grads"]), np.array(b["grads"])
        # the regulariser carries a large share of the gradient here (lamb = 1)
        assert np.allclose(ga, gb, rtol=1e-4, atol=1e-6), (reg, np.abs(ga - gb).max())
        # the published gather (local slice of the gradient) would halve the reg's share
        assert not np.allclose(np.array(b["grads_published"]), ga, rtol=1e-3, atol=1e-6)


GATHER_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from util.dist import gather_with_grad
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
x1, x2 = (torch.randn(3, 4, requires_grad=True) for _ in range(2))
weight = torch.randn(3 * w, 4, generator=torch.Generator().manual_seed(9))
((gather_with_grad(x1) + gather_with_grad(x2)) * weight).sum().backward()  # one gradient tensor, two gathers
# every rank's copy of the global loss sends its rows' gradient here: w times this rank's weight rows
ok = all(torch.equal(x.grad, w * weight[3 * r:3 * r + 3]) for x in (x1, x2))
print("ok" if ok else f"rank {{r}}: {{x1.grad}} {{x2.grad}}")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("world", [2, 3])
def test_gather_with_grad_sums_each_ranks_rows_when_two_gathers_share_a_gradient(tmp_path, world):
    from conftest import REPO
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT.format(repo=REPO))
    proc = run_script(script, torchrun=world, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("ok") == world and "rank" not in proc.stdout, proc.stdout  # lines may interleave


def test_tcr_uses_no_error_checking_cholesky(monkeypatch):
    # torch.linalg.cholesky reads its status back to raise on failure: a host sync on
    # CUDA in every M-MAE step. cholesky_ex does not; a failure becomes a non-finite loss.
    def syncing(*a, **k):
        raise AssertionError("torch.linalg.cholesky syncs the host on CUDA")
    monkeypatch.setattr(torch.linalg, "cholesky", syncing)
    x = torch.randn(16, 8, dtype=torch.float64)
    assert uniformity_loss_TCR(x, 2.0, True).item() == pytest.approx(ref_tcr(x.numpy(), 2.0, True), rel=1e-9)


# ---- TF32: a stated choice, and never inside the regulariser or the GPU resize ------------------
class MatmulTF32Seen(torch.overrides.TorchFunctionMode):
    """Records torch.backends.cuda.matmul.allow_tf32 at every matmul (what cuBLAS would use)."""
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm", "bmm"):
            self.seen.append(torch.backends.cuda.matmul.allow_tf32)
        return func(*args, **(kwargs or {}))


def test_tf32_flag_and_full_fp32_regions():
    from util.amp import full_fp32_matmul, set_tf32
    from util.cli import add_common_args, Parser
    from util.gpu_aug import crop_resize_flip
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        feats = torch.randn(12, 8)
        imgs = torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8)
        params = torch.tensor([[0, 0, 20, 24, 0], [2, 3, 10, 12, 1]])
        with MatmulTF32Seen() as mode:
            uniformity_loss(feats), uniformity_loss_TCR(feats), uniformity_loss_TCR(feats, centering=True)
            crop_resize_flip(imgs, params, 16)
        assert mode.seen and not any(mode.seen)  # every matmul of them in full float32
        assert torch.backends.cuda.matmul.allow_tf32  # and the run's choice restored after
        with pytest.raises(RuntimeError):
            with full_fp32_matmul():
                raise RuntimeError
        assert torch.backends.cuda.matmul.allow_tf32
        set_tf32(False)
        assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    parser = Parser()
    add_common_args(parser)
    assert parser.parse_args([]).tf32 is False and parser.parse_args(["--tf32"]).tf32 is True
