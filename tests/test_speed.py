"""The speed benchmarks and the fast paths compute the right thing (no timing is asserted):
smoke runs, our loss == the official-choices reference loss, compile == eager, the FLOPs
model against torch's FlopCounterMode, oneDNN linears == nn.Linear, and the device-decode
augmentation against the PIL pipeline."""
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO, run_script

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import pretrain_speed as ps  # noqa: E402

import models_mae  # noqa: E402
from engine_pretrain import compute_losses  # noqa: E402
from cpu_speed import OneDNNLinear, onednn_available, tune_for_cpu, use_onednn_linear  # noqa: E402
from util.datasets import pretrain_transform  # noqa: E402
from util.gpu_aug import PlanCrop, collate_encoded, decode_augment, read_encoded  # noqa: E402
from util.optim import adamw  # noqa: E402


def tiny_mae(**kw):
    torch.manual_seed(0)
    return models_mae.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                           nb_classes=10, **kw)


def cli(**kw):
    args = ps.get_args_parser().parse_args([])
    args.device, args.amp = "cpu", "none"
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def batch(n=8, size=16, classes=10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---- benchmark smoke runs ------------------------------------------------------------
def test_pretrain_smoke_prints_every_field_and_exits_0():
    proc = run_script("benchmarks/pretrain_speed.py", "--smoke", "--threads", "1", timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    for method in ("mae", "umae", "mmae"):
        assert re.search(rf"check {method}: .* ok$", out, re.M), out
        assert f"speed-up {method}:" in out
        rows = [line for line in out.splitlines() if re.match(rf"(ours|reference)\s+{method}\s", line)]
        assert len(rows) == 2, out
        for row in rows:
            ips = float(re.search(r"images/s\s+([\d.]+)", row).group(1))
            step = float(re.search(r"step\s+([\d.]+) ms", row).group(1))
            assert ips > 0 and step > 0 and math.isclose(ips, 8 / (step / 1e3), rel_tol=1e-3)
            assert re.search(r"mem\s+[\d.]+ MiB", row) and re.search(r"MFU\s+[\d.]+%", row)
    assert re.search(r"FLOPs/img: [\d.]+ GFLOP forward", out)
    assert "regulariser cost umae" in out and "regulariser cost mmae" in out


def test_memory_is_taken_after_the_optimizer_state_exists():
    # AdamW creates its state in its first step: measuring that step would count the
    # state as the step's peak and miss the activations (ViT-L read as constant in batch)
    model = tiny_mae()
    optimizer = adamw(model, ps.our_args(cli(), "mae"))
    samples, targets = batch()
    calls = []

    def steps(n):
        calls.append((n, len(optimizer.state)))
        ps.our_steps(model, optimizer, ps.grad_scaler(torch.device("cpu"), "none"), samples, targets,
                     ps.our_args(cli(), "mae"), n)

    path = ps.Path("ours", "mae", steps)
    ps.warm_up([path], 0, torch.device("cpu"), model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert calls == [(1, 0), (1, len(trainable))]  # the measured step starts with the state there
    # weights + AdamW's two moments and step counter per trainable tensor (float32)
    weights_and_adam = (sum(p.numel() * 4 for p in model.parameters())
                        + sum((2 * p.numel() + 1) * 4 for p in trainable))
    assert path.peak > ps.state_bytes(model, optimizer) == weights_and_adam


def test_smoke_exits_1_when_the_losses_differ(monkeypatch):
    real = ps.reference_loss
    monkeypatch.setattr(ps, "reference_loss", lambda *a, **k: real(*a, **k) * 1.01)
    threads = torch.get_num_threads()
    try:
        assert ps.main(["--smoke", "--methods", "mae", "--repeats", "1", "--warmup", "1",
                        "--threads", "1", "--peak_tflops", "1"]) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("simplejpeg", [True, False])
def test_data_speed_smoke(simplejpeg, tmp_path):
    """Also on a machine without simplejpeg (the GPU machine has none): it runs, saying so."""
    env = None
    if not simplejpeg:
        (tmp_path / "simplejpeg.py").write_text("raise ImportError('hidden by the test')\n")
        env = {"PYTHONPATH": str(tmp_path)}
    proc = run_script("benchmarks/data_speed.py", "--smoke", timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert ("simplejpeg not installed" in proc.stdout) == (not simplejpeg)
    for name in ("pil", "worker", "tensor"):
        assert re.search(rf"^{name}\s+images/s per core\s+[\d.]+", proc.stdout, re.M), proc.stdout
    assert len([line for line in proc.stdout.splitlines() if "ESTIMATE" in line and "cores/GPU" in line]) == 2
    assert "peak: --peak_tflops 989 TFLOP/s (datasheet); not measured (--device cpu: no GPU here)" in proc.stdout


def test_pipeline_rate_times_one_long_lived_iterator_after_its_warm_up():
    """benchmarks/pipeline_rate.py's method: the endless sampler runs TrainSampler's epochs
    back to back (epoch 0's samples, then epoch 1's, ...); loader_rate takes the warm-up
    batches (every worker's first prefetched ones) before the clock starts, then times
    >= 4 batches per worker from the same iterator. An iterator whose first batches are
    slow (worker start-up) and the rest 20 ms each gives the 20 ms rate."""
    import time
    from pipeline_rate import Endless, loader_rate, warm_up_batches
    from util.datasets import TrainSampler
    sampler = TrainSampler(list(range(10)), 4, seed=0)
    pairs = iter(Endless(sampler))
    got = [next(pairs) for _ in range(3 * 8)]  # 2 batches of 4 per epoch
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert got[8 * epoch:8 * epoch + 8] == list(sampler)
    served = []

    def batches(workers):
        for k in range(10 ** 6):
            served.append(k)
            time.sleep(0.5 if k < warm_up_batches(workers) else 0.02)
            yield torch.zeros(2, 3, 4, 4), torch.zeros(2)

    rate, shape, steps = loader_rate(batches(3), 2, 3, "cpu")
    assert steps == 12 and len(served) == warm_up_batches(3) + 12 and shape == (2, 3, 4, 4)
    assert 2 / 0.04 < rate < 2 / 0.02, rate  # 100 img/s at most; the 0.5 s batches would give < 20


def test_pipeline_rate_smoke_times_both_loaders_with_the_stated_workers():
    proc = run_script("benchmarks/pipeline_rate.py", "--smoke", "--workers", "1", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| default") or line.startswith("| --gpu")]
    assert len(rows) == 2 and all(re.match(r"\| [^|]+ \| 1 \| [\d,.]+ \| 8 \| [\d,.]+ \|$", r) for r in rows), rows


@pytest.mark.parametrize("wheels", ["missing", "broken"])
def test_device_plan_runs_the_acceptance_whatever_the_wheels(tmp_path, wheels):
    """benchmarks/device_plan.sh: no wheel folder, or a wheel pip cannot install, is one line
    and the acceptance still runs (its sections skipped here to keep it short), then the
    planned and measured time; the report file is written. (The former documented command
    chained pip install && the acceptance: with either, nothing ran.)"""
    import subprocess
    whl = tmp_path / "whl"
    if wheels == "broken":
        whl.mkdir()
        (whl / "simplejpeg-0-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"not a zip")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WHL": str(whl), "SITE": str(tmp_path / "site"),
           "PYTHON": sys.executable, "LIMIT": "200"}
    proc = subprocess.run(["bash", "benchmarks/device_plan.sh", "1", "--quick",
                           "--skip", "peak,speed_b,train,race,overhead"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want = "wheels: none in" if wheels == "missing" else "wheels: pip install from"
    assert want in proc.stdout and "acceptance passed" in proc.stdout, proc.stdout
    assert re.search(r"^device command 1: planned at most 200 s, measured \d+ s", proc.stdout, re.M), proc.stdout
    assert (tmp_path / "out" / "plan1.md").read_text().count("GPU acceptance") == 1


def test_cpu_kernels_runs():
    proc = run_script("benchmarks/cpu_kernels.py", "--repeats", "1", "--batch_size", "2", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("matmul ") == 6 and proc.stdout.count("attention fwd+bwd") == 4
    assert re.search(r"AdamW step, .* for-loop [\d.]+ ms, foreach [\d.]+ ms, fused [\d.]+ ms", proc.stdout)


# ---- the two paths compute the same thing -----------------------------------------------
@pytest.mark.parametrize("method", ["mae", "umae", "mmae"])
def test_our_loss_and_gradients_equal_the_reference(method):
    model = tiny_mae()
    ref = ps.reference_model(model)
    samples, targets = batch()
    checks = ps.check_same_loss(model, ref, samples, targets, cli(), [method], model.patch_embed.num_patches)
    (_, ours, theirs, rtol, ok), = checks
    assert ok and rtol == 1e-4 and abs(ours - theirs) <= 1e-5 * abs(theirs)

    noise = torch.rand(8, model.patch_embed.num_patches)
    loss, _, _ = compute_losses(model, samples, targets, ps.our_args(cli(), method), noise)
    loss.backward()
    ps.reference_loss(ref, samples, targets, ps.our_args(cli(), method), noise).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_path_matches_fp32_reference_within_amp_tolerance():
    model = tiny_mae()
    samples, targets = batch()
    checks = ps.check_same_loss(model, ps.reference_model(model), samples, targets, cli(amp="bf16"),
                                ["mae", "mmae"], model.patch_embed.num_patches)
    assert all(ok and rtol == 2e-2 for *_, rtol, ok in checks)


def test_check_detects_other_weights():
    model = tiny_mae()
    ref = ps.reference_model(model)
    with torch.no_grad():
        ref.decoder_pred.weight.mul_(3)
    samples, targets = batch()
    (*_, ok), = ps.check_same_loss(model, ref, samples, targets, cli(), ["mae"], model.patch_embed.num_patches)
    assert not ok


def test_reference_reproduces_the_official_choices():
    model = tiny_mae()
    ref = ps.reference_model(model)
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attn and all(m.fused_attn for m in attn)  # ours: SDPA (timm's default)
    assert all(not m.fused_attn for m in ref.modules() if hasattr(m, "fused_attn"))
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    opt = ps.reference_optimizer(ref)
    assert opt.defaults["foreach"] is False and opt.defaults["fused"] is False
    assert adamw(model, ps.our_args(cli(), "mae")).defaults["fused"] is True  # fused on CPU too


def test_published_regularizers_equal_ours():
    from loss_func import uniformity_loss, uniformity_loss_TCR
    f = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ps.published_regularizer(f, "uniformity"), uniformity_loss(f))
    torch.testing.assert_close(ps.published_regularizer(f, "tcr", 3.0), uniformity_loss_TCR(f, 3.0))


# ---- FLOPs model ---------------------------------------------------------------------
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_flops_model_equals_torch_flop_counter(mask_ratio):
    model = ps.reference_model(tiny_mae())  # unfused attention: its matmuls are counted as bmm
    samples, _ = batch()
    with FlopCounterMode(display=False) as counter:
        model(samples, mask_ratio)
    flops, parts = ps.model_flops_per_image(model, mask_ratio)
    assert counter.get_total_flops() == flops * samples.shape[0]
    assert flops == sum(parts.values()) and parts["encoder"] > parts["patch_embed"] > 0


def test_training_flops_are_three_forwards_less_unneeded_input_grads():
    model = ps.reference_model(tiny_mae())
    samples, _ = batch()
    flops, parts = ps.model_flops_per_image(model, 0.75)
    with FlopCounterMode(display=False) as counter:
        model(samples, 0.75)[0].backward()
    # backward = 2x forward, except: the patch embedding needs no input gradient, and the
    # online head gets no gradient from the MAE loss alone (its CE is left out here)
    expected = 3 * flops - parts["patch_embed"] - 2 * parts["online_head"]
    assert counter.get_total_flops() == expected * samples.shape[0]


# ---- oneDNN linear -------------------------------------------------------------------
@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_onednn_linear_equals_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    fast = nn.Linear(24, 40)
    fast.load_state_dict(lin.state_dict())
    assert use_onednn_linear(nn.Sequential(fast)) == 1 and type(fast) is OneDNNLinear
    assert list(fast.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 7, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = lin(x), fast(x2)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.weight.grad, lin.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.bias.grad, lin.bias.grad, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # falls back to nn.Linear's autocast path
        assert fast(x).dtype == torch.bfloat16
    fast.weight.requires_grad_(False)  # a frozen weight gets no gradient computed
    fast.weight.grad = x.grad = None
    fast(x).backward(g)
    assert fast.weight.grad is None and x.grad is not None


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_onednn_ops_pass_torch_opcheck():
    # schema, fake (meta) kernels, autograd registration, AOT dispatch: what compile relies on
    from cpu_speed import onednn_linear, onednn_linear_backward
    x, w, b = torch.randn(3, 5, 24, requires_grad=True), torch.randn(40, 24, requires_grad=True), torch.randn(40)
    for args in ((x, w, b), (x, w, None)):
        torch.library.opcheck(onednn_linear, args)
    g = torch.randn(3, 5, 40)
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(onednn_linear_backward, (g, x.detach(), w.detach(), need_x, need_w))
    wide = torch.randn(3, 5, 8)  # output narrower than the input: the other transposed copy
    gx, gw = onednn_linear_backward(wide, x.detach(), torch.randn(8, 24), True, True)
    torch.testing.assert_close(gw, wide.reshape(-1, 8).t() @ x.detach().reshape(-1, 24), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_onednn_model_loss_equals_reference():
    model = tiny_mae()
    ref = ps.reference_model(model)
    n = use_onednn_linear(model)
    assert n == sum(isinstance(m, nn.Linear) for m in ref.modules())
    samples, targets = batch()
    (*_, ok), = ps.check_same_loss(model, ref, samples, targets, cli(), ["umae"], model.patch_embed.num_patches)
    assert ok


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_tune_for_cpu_picks_by_precision_and_keeps_the_loss():
    fp32, bf16 = tiny_mae(), tiny_mae()
    ref = ps.reference_model(fp32)
    n_linear = sum(type(m) is nn.Linear for m in fp32.modules())
    keys = list(fp32.state_dict())
    tune_for_cpu(fp32, "none")
    assert sum(type(m) is OneDNNLinear for m in fp32.modules()) == n_linear and list(fp32.state_dict()) == keys
    assert all(m.fused_attn for m in fp32.modules() if hasattr(m, "fused_attn"))
    tune_for_cpu(bf16, "bf16")
    assert not any(type(m) is OneDNNLinear for m in bf16.modules())
    assert not any(m.fused_attn for m in bf16.modules() if hasattr(m, "fused_attn"))
    samples, targets = batch()
    for model, amp in ((fp32, "none"), (bf16, "bf16")):
        checks = ps.check_same_loss(model, ref, samples, targets, cli(amp=amp), ["mae", "mmae"],
                                    model.patch_embed.num_patches)
        assert all(ok for *_, ok in checks), checks


# ---- device-decode augmentation --------------------------------------------------------
def jpeg_file(tmp_path, name="a.jpg", size=(120, 90), fmt="JPEG"):
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
    img = small.resize(size, Image.BICUBIC)
    path = str(tmp_path / name)
    img.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


@pytest.mark.parametrize("fmt,name", [("JPEG", "a.jpg"), ("PNG", "b.png")])
def test_device_decode_path_matches_pil_pipeline(tmp_path, fmt, name):
    path = jpeg_file(tmp_path, name, fmt=fmt)
    pil_tf = pretrain_transform(32)
    for seed in range(4):  # same seed -> same crop box and flip in both paths
        torch.manual_seed(seed)
        with Image.open(path) as im:
            want = pil_tf(im.convert("RGB"))
        torch.manual_seed(seed)
        data, params = PlanCrop()(read_encoded(path))
        assert (data.dim() == 1) == (fmt == "JPEG")  # PNG is decoded in the worker
        got = decode_augment([data], params[None], 32, "cpu")[0]
        assert got.shape == want.shape == (3, 32, 32)
        # JPEG decoders (PIL vs torchvision) and resampling rounding: a few levels of 255
        diff = (got - want).abs() * 0.226 * 255
        assert diff.mean() < 1.5 and diff.max() < 30, (seed, diff.mean(), diff.max())


def test_collate_encoded_and_batch_decode(tmp_path):
    paths = [jpeg_file(tmp_path, f"{i}.jpg", size=(100 + 10 * i, 80)) for i in range(3)]
    torch.manual_seed(0)
    datas, params, targets = collate_encoded([(PlanCrop()(read_encoded(p)), i) for i, p in enumerate(paths)])
    assert len(datas.unpack()) == 3 and params.shape == (3, 5) and targets.tolist() == [0, 1, 2]
    out = decode_augment(datas, params, 16, "cpu")
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_read_encoded_names_a_bad_file(tmp_path):
    from util.errors import UserError
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.jpg"):
        read_encoded(str(bad))


# ---- CUDA only (the GPU machine) -----------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["mae", "umae", "mmae"])
def test_cuda_training_step_has_no_host_sync(method):
    # The step as engine_pretrain runs it under bf16: forward, regulariser, backward,
    # (disabled) grad scaler, fused AdamW, on-device metrics. Any device-to-host copy or
    # synchronising call inside it raises under sync debug mode "error".
    from util.amp import grad_scaler
    model = tiny_mae().cuda()
    args = ps.our_args(cli(amp="bf16", device="cuda"), method)
    optimizer = adamw(model, args)
    scaler = grad_scaler("cuda", "bf16")
    samples, targets = (t.cuda() for t in batch())

    def step():
        loss, parts, logits = compute_losses(model, samples, targets, args)
        acc = (logits.detach().argmax(dim=-1) == targets).float().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), acc

    step()  # lazy initialisation (cuBLAS handles, optimizer state) may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            loss, _ = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


KEEP_FREED_PROBE = """
import resource, sys, torch
sys.path.insert(0, {repo!r} + "/benchmarks")
from cpu_speed import keep_freed_memory
import ctypes
try:  # both start from glibc's initial mmap threshold, held fixed (it drifts with history)
    ctypes.CDLL(None).mallopt(-3, 128 * 1024)
except AttributeError:
    print("unsupported"); sys.exit(0)
if {keep} and not keep_freed_memory():
    print("unsupported"); sys.exit(0)
def cycle():  # a step's pattern: many large tensors written, then all freed
    ts = [torch.ones(2 << 20) for _ in range(10)]
    del ts
cycle(); cycle()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 3)
"""


def test_keep_freed_memory_stops_refaulting_freed_tensors():
    import subprocess
    import sys
    faults = {}
    for keep in (False, True):  # process-wide, so each in its own process
        out = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE.format(repo=ps.ROOT, keep=keep)],
                             capture_output=True, text=True, check=True).stdout.strip()
        if out == "unsupported":
            pytest.skip("no glibc mallopt")
        faults[keep] = float(out)
    # Each cycle writes 80 MiB = 20,480 pages. From glibc's initial threshold every block
    # is mmapped and re-faulted (left alone the threshold drifts with the process's history:
    # 7,500 faults per cycle in one run here, 680 in another); keep_freed_memory reuses them.
    assert faults[False] > 10000 and faults[True] < 2048, faults
