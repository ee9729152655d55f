"""Evaluation of pretrained encoders: loading (ours / official), position-embedding
interpolation, frozen linear probe with LARS, layer-wise lr decay, fine-tuning,
exact distributed evaluation, resume, and bad input."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import models_mae
import models_vit
from conftest import REPO, assert_one_line_error, free_port, run_script
from main_finetune import build_optimizer
from main_finetune import get_args_parser as finetune_parser
from main_linprobe import add_probe_head, lars
from util import checkpoint as ckpt
from util.amp import grad_scaler
from util.errors import UserError
from util.lr_sched import lr_at
from util.pos_embed import get_2d_sincos_pos_embed, get_2d_sincos_pos_embed_from_grid

PRETRAIN_ONLY = ("decoder_", "mask_token", "online_head.")
# A linear probe small enough for CPU: ViT-Tiny width, 16x16 images, 8x8 patches.
PROBE = ["--model", "vit_tiny_patch16", "--input_size", "16", "--patch_size", "8", "--batch_size", "16",
         "--synthetic_size", "256", "--num_workers", "0", "--epochs", "5", "--warmup_epochs", "1",
         "--lr", "5", "--print_freq", "100", "--save_every", "2"]


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def save_pretrained(out, img_size=16, patch_size=8, model="mae_vit_tiny_patch16", seed=0):
    """A pretraining checkpoint exactly as main_pretrain.py writes it (save_training)."""
    torch.manual_seed(seed)
    mae = models_mae.MODELS[model](img_size=img_size, patch_size=patch_size, nb_classes=10)
    args = argparse.Namespace(output_dir=str(out), model=model, input_size=img_size, patch_size=patch_size,
                              epochs=1, save_every=1)
    opt = torch.optim.AdamW(mae.parameters())
    return mae, ckpt.save_training(args, 0, mae, opt, grad_scaler("cpu", "none"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return save_pretrained(tmp_path_factory.mktemp("pretrain"))


@pytest.fixture(scope="module")
def probe_run(pretrained, tmp_path_factory):
    """One short linear probe of the pretrained tiny encoder, shared by several tests."""
    out = str(tmp_path_factory.mktemp("probe") / "run")
    proc = run_script("main_linprobe.py", *PROBE, "--finetune", pretrained[1], "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


# ---- loading -----------------------------------------------------------------
@pytest.mark.parametrize("global_pool", [False, True])
def test_loads_our_pretraining_checkpoint(tmp_path, global_pool):
    mae, path = save_pretrained(tmp_path, img_size=16, patch_size=4)
    vit = models_vit.vit_tiny_patch16(img_size=16, patch_size=4, num_classes=7, global_pool=global_pool)
    missing, dropped = models_vit.load_pretrained(vit, path, "vit_tiny_patch16")
    new = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    assert set(missing) == new
    assert {"mask_token", "decoder_pred.weight", "online_head.weight"} <= set(dropped)
    assert ("norm.weight" in dropped) == global_pool  # MAE: final norm unused with global pooling
    ref = mae.state_dict()
    for k, v in vit.state_dict().items():
        if k not in new:
            assert torch.equal(v, ref[k]), k
    if global_pool:
        assert torch.equal(vit.fc_norm.weight, torch.ones(192)) and torch.equal(vit.fc_norm.bias, torch.zeros(192))
    else:  # same encoder: the unmasked latent of models_mae equals timm's forward_features
        x = torch.randn(2, 3, 16, 16)
        keep_order = torch.arange(16.0).expand(2, 16)
        with torch.no_grad():
            latent, _, _ = mae.eval().forward_encoder(x, 0.0, noise=keep_order)
            torch.testing.assert_close(vit.eval().forward_features(x), latent, rtol=1e-5, atol=1e-5)


def test_loads_official_mae_layout(tmp_path):
    """Official MAE pretrained files hold {'model': encoder weights} only, no args."""
    torch.manual_seed(1)
    mae = models_mae.mae_vit_tiny_patch16(img_size=16, patch_size=4)
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith(PRETRAIN_ONLY)}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.11.mlp.fc2.bias"} <= set(encoder)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": encoder}, path)
    vit = models_vit.vit_tiny_patch16(img_size=16, patch_size=4, num_classes=5, global_pool=False)
    missing, dropped = models_vit.load_pretrained(vit, str(path), "vit_tiny_patch16")
    assert missing == ["head.bias", "head.weight"] and dropped == []
    for k, v in encoder.items():
        assert torch.equal(vit.state_dict()[k], v), k


def test_pos_embed_interpolated_to_new_grid(tmp_path):
    """14x14 -> 16x16 patch grid: the cls row is kept and each new cell holds the
    sin-cos embedding of its centre's position on the old grid (smooth, so bicubic
    resampling is close); a transposed layout would be far off."""
    mae, path = save_pretrained(tmp_path, img_size=56, patch_size=4)
    vit = models_vit.vit_tiny_patch16(img_size=64, patch_size=4, num_classes=3)
    models_vit.load_pretrained(vit, path, "vit_tiny_patch16")
    got = vit.pos_embed.detach()[0]
    assert got.shape == (1 + 16 * 16, 192)
    assert torch.equal(got[0], mae.pos_embed[0, 0])
    assert torch.allclose(mae.pos_embed[0, 1:], torch.from_numpy(get_2d_sincos_pos_embed(192, 14)).float())
    centres = (np.arange(16) + 0.5) * 14 / 16 - 0.5
    gw, gh = np.meshgrid(centres, centres)
    want = torch.from_numpy(get_2d_sincos_pos_embed_from_grid(192, np.stack([gw, gh]).reshape(2, 1, 16, 16))).float()
    err = (got[1:] - want).abs()
    assert err.max() < 0.05 and err.mean() < 0.005, (err.max(), err.mean())
    assert nn.functional.cosine_similarity(got[1:], want, dim=1).min() > 0.999
    transposed = want.reshape(16, 16, 192).transpose(0, 1).reshape(256, 192)
    assert (got[1:] - transposed).abs().max() > 0.5
    # corners of the image stay at the corners
    assert torch.allclose(got[1], mae.pos_embed[0, 1], atol=0.05)
    assert torch.allclose(got[-1], mae.pos_embed[0, -1], atol=0.05)


def test_wrong_model_size_or_corrupt_file_is_a_user_error(pretrained, tmp_path):
    small = models_vit.vit_small_patch16(img_size=16, patch_size=8, num_classes=10)
    with pytest.raises(UserError, match=r"192-d, 12-block .*vit_small_patch16 is 384-d"):
        models_vit.load_pretrained(small, pretrained[1], "vit_small_patch16")
    other_patch = models_vit.vit_tiny_patch16(img_size=16, patch_size=4, num_classes=10)
    with pytest.raises(UserError, match="patch size 8"):
        models_vit.load_pretrained(other_patch, pretrained[1], "vit_tiny_patch16")
    bad = tmp_path / "bad.pth"  # a copy cut short, as after a crash mid-copy
    bad.write_bytes(open(pretrained[1], "rb").read()[:100000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        models_vit.load_pretrained(other_patch, str(bad), "vit_tiny_patch16")
    torch.save({"state_dict": {}}, tmp_path / "nomodel.pth")
    with pytest.raises(UserError, match="no 'model' entry"):
        models_vit.load_pretrained(other_patch, str(tmp_path / "nomodel.pth"), "vit_tiny_patch16")


# ---- optimisers ----------------------------------------------------------------
@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_scales_as_mae(global_pool):
    """MAE: num_layers = depth + 1; scale = decay^(num_layers - layer_id) with layer 0 for
    patch_embed/cls_token/pos_embed, i + 1 for block i, num_layers for norm/fc_norm/head."""
    model = models_vit.vit_tiny_patch16(img_size=16, patch_size=8, num_classes=10, global_pool=global_pool)
    args = finetune_parser().parse_args(["--layer_decay", "0.75", "--device", "cpu"])
    args.lr = 1e-3
    optimizer = build_optimizer(model, args)
    scale, decay = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale[id(p)], decay[id(p)] = group["lr_scale"], group["weight_decay"]
    depth, d = 12, 0.75
    names = dict(model.named_parameters())
    assert len(scale) == len(names)  # every parameter is optimised once
    expected = {"patch_embed.proj.weight": d ** 13, "patch_embed.proj.bias": d ** 13,
                "cls_token": d ** 13, "pos_embed": d ** 13, "head.weight": 1.0, "head.bias": 1.0}
    for i in range(depth):
        expected[f"blocks.{i}.attn.qkv.weight"] = d ** (depth - i)
        expected[f"blocks.{i}.norm1.bias"] = d ** (depth - i)
    top = ["fc_norm.weight", "fc_norm.bias"] if global_pool else ["norm.weight", "norm.bias"]
    expected.update({k: 1.0 for k in top})
    for k, v in expected.items():
        assert scale[id(names[k])] == pytest.approx(v), k
    for k in ("cls_token", "pos_embed", "blocks.0.norm1.weight", "head.bias", top[0]):
        assert decay[id(names[k])] == 0.0, k
    for k in ("patch_embed.proj.weight", "blocks.3.mlp.fc1.weight", "head.weight"):
        assert decay[id(names[k])] == 0.05, k


def mae_lars_step(params, state, lr, momentum=0.9, trust=0.001, weight_decay=0.0):
    """MAE's util/lars.py update, written out as the reference."""
    for p in params:
        dp = p.grad
        if p.ndim > 1:
            dp = dp.add(p, alpha=weight_decay)
            q = torch.where(p.norm() > 0, torch.where(dp.norm() > 0, trust * p.norm() / dp.norm(),
                                                      torch.ones(())), torch.ones(()))
            dp = dp.mul(q)
        mu = state.setdefault(id(p), torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.data.add_(mu, alpha=-lr)


def test_lars_matches_mae_update():
    torch.manual_seed(0)
    model = add_probe_head(models_vit.vit_tiny_patch16(img_size=16, patch_size=8, num_classes=10))
    reference = [p.detach().clone().requires_grad_() for p in model.head.parameters()]
    optimizer = lars(model.head, argparse.Namespace(lr=2.0, weight_decay=0.0))
    state = {}
    for _ in range(4):
        grads = [torch.randn_like(p) for p in reference]
        for p, q, g in zip(model.head.parameters(), reference, grads):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        mae_lars_step(reference, state, lr=2.0)
    for p, q in zip(model.head.parameters(), reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


# ---- linear probe, evaluation, resume --------------------------------------------
def test_probe_freezes_encoder_modules():
    model = add_probe_head(models_vit.vit_tiny_patch16(img_size=16, patch_size=8, num_classes=10)).train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert model.head.training and not model.blocks.training and not model.norm.training
    out = model(torch.randn(4, 3, 16, 16))
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is None and model.head[1].weight.grad is not None


def test_linear_probe_learns_and_keeps_encoder_bit_identical(pretrained, probe_run):
    out, proc = probe_run
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(5))
    assert log[-1]["test_acc1"] >= 50.0, log  # chance: 10%
    assert log[-1]["test_loss"] < log[0]["test_loss"]
    assert log[-1]["max_acc1"] == max(r["test_acc1"] for r in log)
    assert {"checkpoint-1.pth", "checkpoint-3.pth", "checkpoint-4.pth", "checkpoint-best.pth"} <= set(os.listdir(out))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    before = pretrained[0].state_dict()
    after = torch.load(os.path.join(out, "checkpoint-4.pth"), weights_only=True)["model"]
    encoder = [k for k in after if not k.startswith("head.")]
    assert len(encoder) == len([k for k in before if not k.startswith(PRETRAIN_ONLY)])
    for k in encoder:
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["head.1.weight"], torch.zeros_like(after["head.1.weight"]))
    best = torch.load(os.path.join(out, "checkpoint-best.pth"), weights_only=True)
    assert best["acc1"] == log[-1]["max_acc1"] and log[best["epoch"]]["test_acc1"] == best["acc1"]


def test_two_process_evaluation_equals_one(probe_run, tmp_path):
    """An odd number of val images (101) and a small batch: the ranks' shards and batch
    counts differ, the summed counts must not."""
    ckpt_path = os.path.join(probe_run[0], "checkpoint-1.pth")  # an epoch with errors left
    common = [*PROBE, "--eval", "--resume", ckpt_path, "--synthetic_size", "404", "--batch_size", "8"]
    results = []
    for world in (1, 2):
        out = tmp_path / f"eval{world}"
        proc = run_script("main_linprobe.py", *common, "--output_dir", out, torchrun=world if world > 1 else 0)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(read_log(out)[-1])
    one, two = results
    assert one["test_n"] == two["test_n"] == 101
    assert 0 < one["test_acc1"] < 100
    assert (one["test_acc1"], one["test_acc5"]) == (two["test_acc1"], two["test_acc5"])
    assert one["test_loss"] == pytest.approx(two["test_loss"], rel=1e-6)


def test_two_process_probe_reports_what_its_checkpoint_scores(pretrained, tmp_path):
    """Each rank updates its own BatchNorm statistics (DDP broadcasts them only at a synced
    forward, and not under accumulation): the accuracy reported in training, and kept as the
    best, must be that of the checkpoint rank 0 saves."""
    out = tmp_path / "two"
    common = [*PROBE, "--epochs", "2", "--synthetic_size", "202", "--batch_size", "4"]
    proc = run_script("main_linprobe.py", *common, "--accum_iter", "2", "--finetune", pretrained[1],
                      "--output_dir", out, torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = read_log(out)[-1]
    proc = run_script("main_linprobe.py", *common, "--eval", "--resume", out / "checkpoint-1.pth",
                      "--output_dir", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = read_log(tmp_path / "eval")[-1]
    assert trained["test_n"] == scored["test_n"] == 50
    assert (trained["test_acc1"], trained["test_acc5"]) == (scored["test_acc1"], scored["test_acc5"])
    assert trained["test_loss"] == pytest.approx(scored["test_loss"], rel=1e-5)


def test_linear_probe_resumes_exactly(pretrained, probe_run, tmp_path):
    straight = probe_run[0]
    split = tmp_path / "split"
    split.mkdir()
    shutil.copy(os.path.join(straight, "checkpoint-1.pth"), split / "checkpoint-1.pth")
    proc = run_script("main_linprobe.py", *PROBE, "--finetune", pretrained[1], "--output_dir", split)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting at epoch 2" in proc.stdout
    a = torch.load(os.path.join(straight, "checkpoint-4.pth"), weights_only=True)["model"]
    b = torch.load(split / "checkpoint-4.pth", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["test_acc1"] for r in read_log(split)] == [r["test_acc1"] for r in read_log(straight)[2:]]


def test_relaunch_with_another_encoder_is_refused(pretrained, tmp_path):
    """The same output folder (the launchers' default) and another --finetune: auto-resume
    would go on with the old encoder. The same file by another name continues."""
    first = pretrained[1]
    other = save_pretrained(tmp_path / "other", seed=1)[1]
    out = tmp_path / "probe run"
    common = [*PROBE, "--epochs", "1", "--synthetic_size", "64", "--output_dir", out]
    assert run_script("main_linprobe.py", *common, "--finetune", first).returncode == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_script("main_linprobe.py", *common, "--finetune", other)
    assert_one_line_error(proc, f"started from --finetune {first}, not {other}", "give a new --output_dir")
    # a relative name, typed in another folder (the saved one is absolute)
    rel = os.path.relpath(other, tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "main_linprobe.py"), *map(str, common),
                           "--finetune", rel], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert_one_line_error(proc, f"started from --finetune {first}, not {other}")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing written or changed
    link = tmp_path / "link.pth"
    link.symlink_to(first)
    proc = run_script("main_linprobe.py", *PROBE, "--epochs", "2", "--synthetic_size", "64", "--output_dir", out,
                      "--finetune", link)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "was saved in a run of --epochs 1; the schedule from here is that of --epochs 2" in proc.stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    # --eval trains nothing: another encoder or schedule named beside it is not in the way
    proc = run_script("main_linprobe.py", *PROBE, "--synthetic_size", "64", "--eval", "--resume",
                      out / "checkpoint-1.pth", "--finetune", other, "--output_dir", tmp_path / "ev")
    assert proc.returncode == 0 and "note:" not in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


# ---- fine-tuning -----------------------------------------------------------------
def test_finetune_runs_with_layer_decayed_lrs(pretrained, tmp_path):
    out = tmp_path / "ft"
    proc = run_script("main_finetune.py", "--model", "vit_tiny_patch16", "--input_size", "16", "--patch_size", "8",
                      "--batch_size", "16", "--synthetic_size", "64", "--num_workers", "0", "--epochs", "2",
                      "--warmup_epochs", "1", "--blr", "1e-3", "--layer_decay", "0.5", "--clip_grad", "1.0",
                      "--print_freq", "100", "--finetune", pretrained[1], "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "new: ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']" in proc.stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in log)
    state = torch.load(out / "checkpoint-1.pth", weights_only=True)
    args = argparse.Namespace(**state["args"])
    last_lr = lr_at(1 + 3 / 4, args)  # lr set at the last step (4 steps per epoch)
    groups = state["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx([0.5 ** k for k in range(13, -1, -1)])
    for g in groups:
        assert g["lr"] == pytest.approx(last_lr * g["lr_scale"])
    before = pretrained[0].state_dict()
    assert not torch.equal(state["model"]["blocks.11.mlp.fc2.weight"], before["blocks.11.mlp.fc2.weight"])


# ---- bad input ---------------------------------------------------------------------
def make_image_folder(root, classes):
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(2):
                Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("case", ["missing_checkpoint", "wrong_size", "nb_classes", "eval_nothing", "odd_mixup"])
def test_bad_input_fails_with_one_line(case, pretrained, tmp_path):
    base = ["--input_size", "16", "--patch_size", "8", "--num_workers", "0", "--output_dir", tmp_path / "o"]
    script, extra, fragment = {
        "missing_checkpoint": ("main_linprobe.py", ["--finetune", tmp_path / "nope.pth"], "does not exist"),
        "wrong_size": ("main_finetune.py", ["--model", "vit_small_patch16", "--finetune", pretrained[1]],
                       "vit_small_patch16 is 384-d"),
        "nb_classes": ("main_linprobe.py", ["--data_path", tmp_path / "data", "--nb_classes", "3",
                                            "--finetune", pretrained[1]], "--nb_classes 3 but the dataset has 2"),
        "eval_nothing": ("main_finetune.py", ["--eval"], "--eval needs a checkpoint"),
        "odd_mixup": ("main_finetune.py", ["--batch_size", "7"], "even --batch_size"),
    }[case]
    make_image_folder(tmp_path / "data", ["a", "b"])
    proc = run_script(script, "--model", "vit_tiny_patch16", *base, *extra)
    assert_one_line_error(proc, fragment)
    assert not os.path.exists(tmp_path / "o" / "checkpoint-0.pth")


@pytest.mark.parametrize("script", ["main_linprobe.py", "main_pretrain.py", "probe_data"])
def test_val_classes_other_than_the_train_ones_are_refused(script, pretrained, tmp_path):
    # train a, b, c and val a, b, d: as many classes, but label 2 means c in one and d in the
    # other, and every accuracy on val was silently wrong
    make_image_folder(tmp_path / "data", ["a", "b", "c"])
    os.rename(tmp_path / "data" / "val" / "c", tmp_path / "data" / "val" / "d")
    base = ["--input_size", "16", "--patch_size", "8", "--num_workers", "0", "--batch_size", "2",
            "--epochs", "1", "--output_dir", tmp_path / "o"]
    if script == "main_linprobe.py":
        proc = run_script(script, "--model", "vit_tiny_patch16", "--finetune", pretrained[1],
                          "--data_path", tmp_path / "data", *base)
        fragment = "the val split's classes differ from the train split's: label 2 is 'c' in train, 'd' in val"
    elif script == "main_pretrain.py":
        proc = run_script(script, "--model", "mae_vit_tiny_patch16", "--data_path", tmp_path / "data", *base)
        fragment = "the val split's classes differ from the train split's: label 2 is 'c' in train, 'd' in val"
    else:
        proc = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch16", "--synthetic_size", "8",
                          "--probe_data", tmp_path / "data", *base)
        fragment = f"--probe_data {tmp_path / 'data'}: the val split's classes differ from the train split's"
    assert_one_line_error(proc, fragment)
    assert not os.path.exists(tmp_path / "o" / "checkpoint-0.pth")


def jpeg_folder_with_bad_images(root, train=(5, 6), val=(4, 3)):
    """Class folders a/ and b/ of JPEGs (per split, images per class: primes and odd sizes),
    the first val image of b/ and the first train image of a/ truncated: (bad val, bad train)."""
    for split, counts in (("train", train), ("val", val)):
        for c, n in zip("ab", counts):
            os.makedirs(root / split / c)
            for i in range(n):
                Image.new("RGB", (20, 18), (30 * i, 80 if c == "a" else 160, 120)).save(root / split / c / f"{i}.jpg")
    bad = root / "val" / "b" / "0.jpg", root / "train" / "a" / "0.jpg"
    for path in bad:
        path.write_bytes(path.read_bytes()[:120])
    return bad


@pytest.mark.parametrize("script", ["main_linprobe.py", "main_analyze.py", "probe_data"])
def test_skip_bad_images_leaves_bad_val_images_out_of_every_evaluation(script, pretrained, tmp_path):
    """--skip_bad_images on the evaluation side of linprobe (finetune shares it), main_analyze
    (val and its kNN bank) and --probe_data (both splits): one line at start per split with a
    bad image, the rest evaluated (6 of 7 val images); without the flag, one error line."""
    bad_val, bad_train = jpeg_folder_with_bad_images(tmp_path / "data")
    base = ["--input_size", "16", "--num_workers", "0", "--batch_size", "4"]
    if script == "main_linprobe.py":
        cmd = ["main_linprobe.py", "--model", "vit_tiny_patch16", "--patch_size", "8", "--finetune", pretrained[1],
               "--data_path", tmp_path / "data", "--epochs", "1", "--warmup_epochs", "0", *base]
        lines = ["skipped 1 unreadable val images of 7"]
        counted = "on 6 val images"
    elif script == "main_analyze.py":
        cmd = ["main_analyze.py", "--checkpoint", pretrained[1], "--data_path", tmp_path / "data", *base,
               "--out_json", tmp_path / "r.json"]
        lines = ["skipped 1 unreadable val images of 7", "skipped 1 unreadable bank images of 11"]
        counted = "bank 10 train images"
    else:
        cmd = ["main_pretrain.py", "--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--synthetic_size", "8",
               "--epochs", "1", "--val_interval", "1", "--vis_every", "0", "--probe_data", tmp_path / "data", *base]
        lines = ["skipped 1 unreadable --probe_data val images of 7",
                 "skipped 1 unreadable --probe_data train images of 11"]
        counted = "probe on 6 --probe_data val images"
    proc = run_script(*cmd, "--skip_bad_images", "--output_dir", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in lines:
        assert sum(line in out for out in proc.stdout.splitlines()) == 1, (line, proc.stdout)
    assert counted in proc.stdout, proc.stdout
    proc = run_script(*cmd, "--output_dir", tmp_path / "b")
    assert_one_line_error(proc, "cannot read image ")
    assert str(bad_val) in proc.stderr or str(bad_train) in proc.stderr


def test_class_difference_names_the_first_label_that_differs():
    from util.datasets import class_difference
    assert class_difference(["a", "b"], ["a", "b"], "train", "val") == ""
    assert class_difference(None, ["a"], "train", "val") == ""  # bare label numbers: not checked
    assert class_difference(["a", "b", "c"], ["a", "b", "d"], "train", "val") == "label 2 is 'c' in train, 'd' in val"
    assert class_difference(["a", "b"], ["a", "b", "c"], "x", "y") == "label 2 is missing in x, 'c' in y (2 vs 3 classes)"


# ---- launchers ---------------------------------------------------------------------
@pytest.mark.parametrize("script", ["linprobe.sh", "finetune.sh"])
def test_launcher_runs_demo_recipe(script, pretrained, tmp_path):
    """The torchrun launchers: a preset plus pass-through arguments that win over it."""
    env = {k: v for k, v in os.environ.items() if k != "GPUS_PER_NODE"}
    # no GPU visible: the launcher's own GPU count (through $PYTHON) gives 1 process
    env = {**env, "CUDA_VISIBLE_DEVICES": "", "RECIPE": "demo", "CKPT": pretrained[1], "BATCH": "16",
           "OUTPUT_DIR": str(tmp_path / "out"), "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(REPO, script), "--input_size", "16", "--patch_size", "8",
                           "--synthetic_size", "64", "--epochs", "1", "--num_workers", "0", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(tmp_path / "out")
    assert [r["epoch"] for r in log] == [0]
    state = torch.load(tmp_path / "out" / "checkpoint-0.pth", weights_only=True)
    assert state["args"]["model"] == "vit_tiny_patch16" and state["args"]["input_size"] == 16
    assert state["args"]["accum_iter"] == 4  # the demo's effective batch 64 with BATCH=16 on 1 GPU
    bad = subprocess.run(["bash", os.path.join(REPO, script)], env={**env, "RECIPE": "nope"},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown RECIPE=nope")
