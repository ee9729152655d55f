"""Reproduction fidelity: where the published recipes' numbers would silently differ.

The regulariser's batch under gradient accumulation, MAE's weight-decay groups,
linear-probe crop and eval resize, official checkpoints, fp16 resume, CUDA RNG."""
import argparse
import datetime
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import fidelity_accum as fa
import models_mae
from conftest import run_script
from util import checkpoint as ckpt
from util.datasets import MAERandomResizedCrop, eval_transform
from util.errors import UserError
from util.optim import adamw


# ---- 1. the regulariser's batch under --accum_iter ----------------------------------------
@pytest.mark.parametrize("reg", ["uniformity", "tcr"])
def test_fidelity_exact_accumulation_equals_one_big_batch(reg):
    """accum_iter k, batch b: the gradients equal one batch of k*b (fp64), mask for mask."""
    args = fa.make_args(reg, "exact")
    imgs, targets = fa.make_data(fa.K * fa.B)
    model = fa.make_model()
    exact = fa.group_grads(model, model, imgs, targets, args, fa.SEED)
    ref = fa.big_batch_grads(fa.make_model(), imgs, targets, args, [fa.SEED])
    assert fa.relative_error(exact, ref) <= 1e-6
    # per micro-batch (--accum_reg micro) is what accumulation gave before: not the big batch
    model = fa.make_model()
    micro = fa.group_grads(model, model, imgs, targets, fa.make_args(reg, "micro"), fa.SEED)
    assert fa.relative_error(micro, ref) > 1e-3


def test_fidelity_exact_accumulation_without_regulariser_changes_nothing():
    args = fa.make_args("none", "exact")
    imgs, targets = fa.make_data(fa.K * fa.B)
    model = fa.make_model()
    grads = fa.group_grads(model, model, imgs, targets, args, fa.SEED)
    ref = fa.big_batch_grads(fa.make_model(), imgs, targets, args, [fa.SEED])
    assert fa.relative_error(grads, ref) <= 1e-6


@pytest.mark.parametrize("reg", ["tcr"])
def test_fidelity_exact_accumulation_under_ddp_two_processes(tmp_path, reg):
    out = tmp_path / "res.json"
    env = {"MASTER_ADDR": "127.0.0.1"}
    proc = run_script("tests/fidelity_accum.py", reg, "exact", out, torchrun=2, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["rel_error"] <= 1e-6


def test_fidelity_main_pretrain_says_which_accumulation_runs(tmp_path, tiny_args):
    common = [*tiny_args, "--accum_iter", "2", "--reg", "tcr", "--lamb", "0.1"]
    proc = run_script("main_pretrain.py", *common, "--output_dir", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "regulariser under accumulation: exact, on the effective batch of 32" in proc.stdout
    proc = run_script("main_pretrain.py", *common, "--accum_reg", "micro", "--output_dir", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "per micro-batch of 16 (--accum_reg micro)" in proc.stdout


def test_fidelity_accumulation_cost_benchmark_runs():
    proc = run_script("benchmarks/accum_cost.py", "--input_size", "16", "--patch_size", "4", "--depth", "1",
                      "--batch_size", "4", "--accum_iter", "2", "--groups", "1", "--repeats", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exact_over_micro=" in proc.stdout.splitlines()[-1]


def _recorded_grads(engine, model, batches, args, skipped):
    """The gradient one epoch of `engine` hands to the optimizer (one group), steps `skipped`."""
    import engine_finetune
    import engine_pretrain
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scaler, run = fa.RecordingScaler(), ckpt.RunState(skip_steps={(0, s) for s in skipped})
    saver = ckpt.CheckpointSaver(args, model, optimizer, scaler, run, torch.device("cpu"))
    if engine == "pretrain":
        engine_pretrain.train_one_epoch(model, model, batches, optimizer, scaler, torch.device("cpu"), 0, run, saver,
                                        args)
    else:
        engine_finetune.train_one_epoch(model, torch.nn.functional.cross_entropy, batches, optimizer, scaler,
                                        torch.device("cpu"), 0, run, saver, args)
    return scaler.grads


def _one_batch_grads(engine, model, batches, args):
    """The reference: the steps' batches as one batch (fp64)."""
    from engine_pretrain import compute_losses
    x, y, *noise = (torch.cat(t) for t in zip(*batches))
    model.zero_grad(set_to_none=True)
    if engine == "pretrain":
        loss = compute_losses(model, x, y, fa.make_args(args.reg, args.accum_reg, 1), noise[0])[0]
    else:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("engine,reg,accum_reg", [("pretrain", "none", "micro"), ("pretrain", "tcr", "exact"),
                                                  ("finetune", "none", "micro")])
@pytest.mark.parametrize("skipped", [(1,), (2,), (0, 2)])
def test_fidelity_skipped_step_gives_the_mean_of_the_steps_that_ran(engine, reg, accum_reg, skipped):
    """accum 3 with steps stepped over (--nan_retries): the group's gradient is one batch of
    the steps that ran, not that times (steps run / 3)."""
    args = fa.make_args(reg, accum_reg, accum_iter=3)
    imgs, targets = fa.make_data(3 * fa.B)
    noise = torch.rand(3 * fa.B, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batches = list(zip(imgs.split(fa.B), targets.split(fa.B), noise.split(fa.B)))
    if engine == "finetune":
        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5)).double()
        batches = [b[:2] for b in batches]
    else:
        make = fa.make_model
    got = _recorded_grads(engine, make(), batches, args, skipped)
    ref = _one_batch_grads(engine, make(), [b for i, b in enumerate(batches) if i not in skipped], args)
    assert fa.relative_error(got, ref) <= 1e-6


# ---- 2. weight-decay groups ------------------------------------------------------------------
def test_fidelity_weight_decay_groups_are_maes():
    """Official (timm 0.3 add_weight_decay, no skip list): no decay for 1-d tensors and
    biases, decay for everything else, cls and mask tokens included."""
    model = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4, nb_classes=10)
    opt = adamw(model, argparse.Namespace(weight_decay=0.05, lr=1e-3, device="cpu"))
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in wd, name  # fixed sin-cos position embeddings
            continue
        official = 0.0 if (p.ndim == 1 or name.endswith(".bias")) else 0.05
        assert wd[id(p)] == official, name
    assert wd[id(model.cls_token)] == 0.05 and wd[id(model.mask_token)] == 0.05


# ---- 3. linear-probe crop ------------------------------------------------------------------------
def mae_official_crop_area(width, height, n, rng):
    """MAE's util/crop.py get_params, in numpy: the area fraction of n boxes."""
    area = width * height * rng.uniform(0.08, 1.0, n)
    ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), n))
    w = np.minimum(np.round(np.sqrt(area * ratio)), width)
    h = np.minimum(np.round(np.sqrt(area / ratio)), height)
    return w * h / (width * height)


def test_fidelity_linprobe_crop_is_maes():
    img = Image.new("RGB", (500, 375))
    torch.manual_seed(0)
    crop = MAERandomResizedCrop(224)
    ours = np.array([h * w for _, _, h, w in (crop.get_params(img, crop.scale, crop.ratio)
                                              for _ in range(20000))]) / (500 * 375)
    official = mae_official_crop_area(500, 375, 20000, np.random.default_rng(0))
    tv = transforms.RandomResizedCrop(224)
    torchvision = np.array([h * w for _, _, h, w in (tv.get_params(img, tv.scale, tv.ratio)
                                                     for _ in range(5000))]) / (500 * 375)
    assert abs(ours.mean() - official.mean()) < 0.01 and abs(ours.mean() - 0.518) < 0.01
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(ours, q) - np.quantile(official, q)) < 0.02
    assert torchvision.mean() < ours.mean() - 0.05  # torchvision's rejection loop: smaller boxes
    from eval_setup import linprobe_transform
    assert isinstance(linprobe_transform(224).transforms[0], MAERandomResizedCrop)


# ---- 4. eval resize ------------------------------------------------------------------------------
@pytest.mark.parametrize("size,resize", [(224, 256), (256, 256), (384, 384), (448, 448), (64, 73)])
def test_fidelity_eval_resize_is_maes(size, resize):
    tf = eval_transform(size)
    assert tf.transforms[0].size == resize and tf.transforms[1].size == (size, size)


# ---- 5. official checkpoints -----------------------------------------------------------------------
def test_fidelity_official_checkpoint_with_namespace_loads(tmp_path):
    path = tmp_path / "official.pth"
    sd = {"cls_token": torch.zeros(1, 1, 8)}
    torch.save({"model": sd, "args": argparse.Namespace(model="mae_vit_base_patch16", lr=1.5e-4),
                "epoch": 799}, path)
    state = ckpt.load_checkpoint(str(path))
    assert state["args"] == {"model": "mae_vit_base_patch16", "lr": 1.5e-4} and state["epoch"] == 799
    assert torch.equal(state["model"]["cls_token"], sd["cls_token"])


def test_fidelity_other_pickled_objects_still_refused(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"model": {}, "args": argparse.Namespace(model="x"), "when": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(UserError, match="pickled objects"):
        ckpt.load_checkpoint(str(path))


# ---- 6. fp16 resume from a bf16 checkpoint ---------------------------------------------------------
def test_fidelity_fp16_resume_from_bf16_checkpoint(tmp_path, tiny_args):
    out = tmp_path / "run"
    proc = run_script("main_pretrain.py", *tiny_args, "--amp", "bf16", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script("main_pretrain.py", *tiny_args, "--amp", "fp16", "--epochs", "2", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has no fp16 loss-scaler state" in proc.stdout and "resumed from" in proc.stdout
    state = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the fp16 run saved its own scaler


# ---- 7. the CUDA RNG of this process's device --------------------------------------------------------
def test_fidelity_cuda_rng_state_is_the_current_devices(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": calls.append(("get", device)) or torch.zeros(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", device)))
    state = ckpt.rng_state()
    ckpt.set_rng_state(state)
    assert calls == [("get", 3), ("set", 3)]


def test_fidelity_per_sample_seeding_leaves_the_cuda_generators_alone(monkeypatch):
    """--num_workers 0 seeds each sample's augmentation in the training process: only the CPU
    generator (saved and restored around it) may be reseeded, never the CUDA ones (drop path and
    anything else drawn on the GPU would restart from the sample's seed)."""
    from util.datasets import EpochSeeded, SyntheticImages
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(seed))
    ds = EpochSeeded(SyntheticImages(4, image_size=8, transform=transforms.RandomResizedCrop(8)), seed=1)
    before = torch.get_rng_state()
    a, b = ds[(0, 2)][0], ds[(0, 2)][0]
    assert seeded == [] and torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.asarray(a), np.asarray(b))  # still seeded per sample
