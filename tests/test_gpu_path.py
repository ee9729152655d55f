"""The CUDA code paths, run on the CPU where PyTorch allows it: fp16 autocast with a
GradScaler, torch.compile (inductor) in the training step, alone and under DDP, and
--gpu_decode with the device set to CPU. `pytest -k "fp16 or compile or gpu_decode"`
selects them (with the gpu_decode tests of test_pretrain.py and test_speed.py).

Not exercisable without a GPU: pinned host memory (pin_memory() needs an accelerator;
the entry points turn --pin_mem off on CPU) and truly asynchronous non_blocking copies.
"""
import json
import os
from types import SimpleNamespace

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import models_mae
from conftest import run_and_resume_after_epoch0, run_script
from engine_pretrain import compute_losses, train_one_epoch
from util.checkpoint import CheckpointSaver, RunState
from util.datasets import pretrain_transform
from util.errors import UserError
from util.gpu_aug import DeviceDecodeLoader, PlanCrop, crop_resize_flip, decode_augment, normalizer, read_encoded

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def tiny(nb_classes=5):
    torch.manual_seed(0)
    return models_mae.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                           nb_classes=nb_classes, norm_pix_loss=True)


def step_args(**kw):
    base = dict(amp="fp16", mask_ratio=0.75, reg="tcr", lamb=0.1, uniformity_mu=1.0, centering=False,
                accum_iter=1, accum_reg="exact", batch_size=8, print_freq=10**9, save_every_steps=0,
                clip_grad=None, lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=1, weight_decay=0.05)
    return SimpleNamespace(**{**base, **kw})


def data(n_batches=1, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g))
            for _ in range(n_batches)]


def epoch(model, batches, optimizer, scaler, args):
    run = RunState()
    saver = CheckpointSaver(args, model, optimizer, scaler, run, torch.device("cpu"))
    return train_one_epoch(model, model, batches, optimizer, scaler, torch.device("cpu"), 0, run, saver, args)


# ---- fp16 with a GradScaler -------------------------------------------------------------------
def test_fp16_gradients_are_unscaled_before_clipping(monkeypatch):
    """The norm clip_grad_norm_ sees is the true gradient's, not 4096x it."""
    model, batches = tiny(), data()
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: seen.append(real_clip(params, float("inf"))) or seen[-1])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    torch.manual_seed(0)  # the mask the engine draws
    epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), scaler, step_args(clip_grad=1.0))
    ref = tiny()  # the same fp16 forward and backward, no scaler at all
    torch.manual_seed(0)
    noise = torch.rand(8, ref.patch_embed.num_patches)
    loss, _, _ = compute_losses(ref, *batches[0], step_args(), noise)
    loss.backward()
    true_norm = torch.norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    assert scaler.get_scale() >= 2.0 ** 12  # no overflow: the scale stayed (or grew)
    assert len(seen) == 1 and abs(seen[0].item() / true_norm.item() - 1) < 0.05, (seen, true_norm)


def test_fp16_step_is_skipped_on_inf_gradients_and_the_scale_halves():
    model, batches = tiny(), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.blocks[0].attn.qkv.weight.register_hook(lambda g: g + float("inf"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    epoch(model, batches, optimizer, scaler, step_args())
    assert scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update at all
    assert not optimizer.state  # the optimizer never stepped


def test_fp16_online_head_gets_no_encoder_gradient_under_autocast():
    model, ((samples, targets),) = tiny(), data()
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(samples, 0.75)
    assert out.logits.dtype == torch.float16  # the head runs under autocast
    torch.nn.functional.cross_entropy(out.logits.float(), targets).backward()
    assert model.online_head.weight.grad is not None and model.online_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("online_head"))


def test_fp16_pretraining_with_accumulation_resumes_exactly(tmp_path, tiny_args):
    """main_pretrain --amp fp16 --accum_iter 2 (exact regulariser): the scaler's state is
    saved and restored, so a run stopped after epoch 0 ends bitwise equal to one in one go."""
    common = [*tiny_args, "--amp", "fp16", "--accum_iter", "2", "--reg", "tcr", "--lamb", "0.1",
              "--epochs", "2", "--save_every", "1", "--warmup_epochs", "0"]
    a, b = run_and_resume_after_epoch0(tmp_path, common)
    first = torch.load(tmp_path / "full" / "checkpoint-0.pth", weights_only=True)
    assert first["scaler"]["scale"] > 0 and "_growth_tracker" in first["scaler"]
    assert a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---- torch.compile ------------------------------------------------------------------------------
@pytest.mark.parametrize("reg,backend,cpu_tune", [("uniformity", "inductor", False), ("tcr", "inductor", False),
                                                  ("tcr", "aot_eager", True)])
def test_compile_step_without_graph_breaks_matches_eager(reg, backend, cpu_tune):
    """What main_pretrain --compile runs on CPU (inductor): the model's forward compiles
    as one graph (fullgraph=True fails on any break) and gives eager's loss and gradients.
    cpu_tune: the benchmarks' oneDNN linear custom ops (benchmarks/cpu_speed.py, an
    experiment outside the product) stay in the graph too (aot_eager: seconds)."""
    model, ((samples, targets),) = tiny(), data()
    if cpu_tune:
        from cpu_speed import tune_for_cpu
        tune_for_cpu(model, "none")
    args = step_args(amp="none", reg=reg)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    noise = torch.rand(8, model.patch_embed.num_patches)
    loss_c, _, _ = compute_losses(compiled, samples, targets, args, noise)
    loss_c.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss_e, _, _ = compute_losses(model, samples, targets, args, noise)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_compile_explain_finds_no_graph_break():
    model, ((samples, _),) = tiny(), data()
    explanation = torch._dynamo.explain(model)(samples, 0.75)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compile_under_ddp_two_gloo_processes_gives_eager_gradients(tmp_path):
    """torch.compile(DDP(model)) with the M-MAE regulariser (its gather inside the
    compiled forward), 2 gloo processes: the DDP-averaged gradients of one step equal
    eager DDP's."""
    out = tmp_path / "res.json"
    proc = run_script("tests/compile_ddp_worker.py", "tcr", out, torchrun=2, env={"MASTER_ADDR": "127.0.0.1"},
                      timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert abs(res["loss_compiled"] - res["loss_eager"]) < 1e-5 * abs(res["loss_eager"]), res
    assert res["n_grads"] > 10 and res["worst_rel"] < 1e-4, res


def test_compile_main_pretrain_under_torchrun(tmp_path, tiny_args):
    """main_pretrain --compile under torchrun with 2 processes and a regulariser trains to
    the end (the launch path users run) and its first steps' loss is eager's."""
    common = [*tiny_args, "--batch_size", "8", "--reg", "tcr", "--lamb", "0.1", "--print_freq", "1"]
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    proc_e = run_script("main_pretrain.py", *common, "--output_dir", eager, torchrun=2)
    assert proc_e.returncode == 0, proc_e.stderr[-3000:]
    proc_c = run_script("main_pretrain.py", *common, "--compile", "--output_dir", comp, torchrun=2, timeout=900)
    assert proc_c.returncode == 0, proc_c.stderr[-3000:]
    assert os.path.isfile(comp / "checkpoint-0.pth")

    def first_loss(stdout):  # step 1's line: the loss of the untouched initial weights
        line = next(line for line in stdout.splitlines() if "Epoch: [0] [1/" in line)
        return float(line.split("  loss: ")[1].split()[0])
    assert abs(first_loss(proc_c.stdout) - first_loss(proc_e.stdout)) < 1e-3 * first_loss(proc_e.stdout)


# ---- --gpu_decode with the device set to CPU ---------------------------------------------------
def odd_jpeg(tmp_path, mode):
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((96, 72), Image.BICUBIC)
    path = str(tmp_path / f"{mode}.jpg")
    small.convert(mode).save(path, format="JPEG", quality=95)
    return path


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_gpu_decode_grayscale_and_cmyk_jpegs_match_the_pil_path(tmp_path, mode):
    path = odd_jpeg(tmp_path, mode)
    with Image.open(path) as im:
        assert im.mode == mode
    pil_tf = pretrain_transform(32)
    for seed in range(3):  # the same seed draws the same box and flip in both paths
        torch.manual_seed(seed)
        with Image.open(path) as im:
            want = pil_tf(im.convert("RGB"))
        torch.manual_seed(seed)
        data_, params = PlanCrop()(read_encoded(path))
        got = decode_augment([data_], params[None], 32, "cpu")[0]
        assert got.shape == want.shape == (3, 32, 32)
        diff = (got - want).abs() * 0.226 * 255  # in levels of 255
        assert diff.mean() < 2.0 and diff.max() < 40, (mode, seed, diff.mean(), diff.max())


def test_gpu_decode_crop_boxes_follow_torchvisions_distribution():
    """PlanCrop draws with RandomResizedCrop's own get_params: over many draws the box
    areas and aspect ratios have torchvision's distribution."""
    from torchvision import transforms
    img = torch.zeros(3, 375, 500, dtype=torch.uint8)
    plan = PlanCrop()
    torch.manual_seed(0)
    ours = np.array([plan((img, 375, 500))[1][2:4].tolist() for _ in range(4000)], dtype=float)
    rrc = transforms.RandomResizedCrop(224, scale=(0.2, 1.0))
    torch.manual_seed(1)
    ref = np.array([rrc.get_params(img, rrc.scale, rrc.ratio)[2:4] for _ in range(4000)], dtype=float)
    for stat in (lambda b: b[:, 0] * b[:, 1] / (375 * 500), lambda b: b[:, 1] / b[:, 0]):
        a, r = stat(ours), stat(ref)
        assert abs(a.mean() - r.mean()) < 0.02 and abs(np.median(a) - np.median(r)) < 0.03


def test_gpu_decode_device_loader_runs_the_training_step(tmp_path, tiny_args):
    """main_pretrain --gpu_decode --device cpu with the regulariser and fp16 autocast."""
    from test_pretrain import make_jpeg_folder
    make_jpeg_folder(tmp_path / "data")
    proc = run_script("main_pretrain.py", *tiny_args, "--data_path", tmp_path / "data", "--batch_size", "4",
                      "--gpu_decode", "--amp", "fp16", "--reg", "uniformity", "--lamb", "0.1",
                      "--output_dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(tmp_path / "out" / "checkpoint-0.pth")


def reference_crop(img, params, size, as_float=False):
    """The per-image path decode_augment had before it was batched: torchvision's
    resized_crop (bicubic, antialiased) and a flip, image by image; uint8 out."""
    from torchvision import transforms
    from torchvision.transforms.v2 import functional as TF
    top, left, h, w, flip = params.tolist()
    crop = TF.resized_crop(img.float() if as_float else img, top, left, h, w, [size, size],
                           interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
    crop = crop.round().clamp(0, 255).to(torch.uint8) if as_float else crop
    return crop.flip(-1) if flip else crop


def photos(height, width, n, seed=0):
    from test_data_pipeline import photo
    return torch.stack([torch.from_numpy(np.array(photo(width, height, seed=seed + i))).permute(2, 0, 1)
                        for i in range(n)]).contiguous()


@pytest.mark.parametrize("height,width,size", [(375, 500, 224), (333, 500, 32), (1000, 700, 64), (50, 40, 224)])
def test_gpu_decode_batched_crop_resize_matches_the_per_image_path(height, width, size):
    """crop_resize_flip (two matrix products for the whole group) against torchvision's
    resized_crop image by image, with PlanCrop's boxes and flips: torch's float filter
    exactly (rounding ties aside), its uint8 kernel (which rounds between the two passes)
    within a level or so on average."""
    imgs = photos(height, width, 6)
    torch.manual_seed(0)
    params = torch.stack([PlanCrop()((None, height, width))[1] for _ in range(6)])
    assert params[:, 4].min() == 0 and params[:, 4].max() == 1  # both flips drawn
    got = crop_resize_flip(imgs, params, size)
    assert got.shape == (6, 3, size, size) and got.dtype == torch.float32
    exact = torch.stack([reference_crop(imgs[i], params[i], size, as_float=True) for i in range(6)]).float()
    diff = (got - exact).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (diff.max(), (diff > 0).float().mean())
    u8 = torch.stack([reference_crop(imgs[i], params[i], size) for i in range(6)]).float()
    diff = (got - u8).abs()
    assert diff.max() <= 3 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_gpu_decode_batch_of_mixed_sizes_and_worker_decoded_files(tmp_path):
    """A batch with JPEGs of two sizes and a CMYK file (decoded in the worker): each
    image normalised as the per-image path would, in the batch's order."""
    from test_data_pipeline import photo, save
    paths = [save(photo(80, 60, seed=i), tmp_path / f"a{i}.jpg") for i in range(3)]
    paths += [save(photo(50, 70, seed=5), tmp_path / "b.jpg"), odd_jpeg(tmp_path, "CMYK")]
    paths.insert(1, paths.pop())  # the CMYK file between the others
    torch.manual_seed(0)
    items = [PlanCrop()(read_encoded(p)) for p in paths]
    datas, params = [d for d, _ in items], torch.stack([p for _, p in items])
    got = decode_augment(datas, params, 24, "cpu")
    from torchvision.io import ImageReadMode, decode_jpeg
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1) * 255
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1) * 255
    for k, (d, p) in enumerate(items):
        img = decode_jpeg(d, mode=ImageReadMode.RGB) if d.dim() == 1 else d
        want = (reference_crop(img, p, 24, as_float=True).float() - mean) / std
        torch.testing.assert_close(got[k], want, rtol=0, atol=1.01 / (0.224 * 255), msg=paths[k])


def test_gpu_decode_collate_packs_the_batch_into_two_tensors_and_back(tmp_path):
    """collate_encoded's data is one uint8 tensor and one int64 table whatever the batch
    size (a list of tensors took one shared-memory file descriptor per image); unpacked,
    each item is the file's exact bytes, or the worker-decoded image, as views of it."""
    from test_data_pipeline import photo, save
    from util.gpu_aug import Packed, collate_encoded
    paths = [save(photo(20 + i, 16, seed=i), tmp_path / f"{i}.jpg") for i in range(5)]
    paths.insert(2, odd_jpeg(tmp_path, "CMYK"))  # decoded in the worker: (3, H, W)
    items = [(PlanCrop()(read_encoded(p)), k) for k, p in enumerate(paths)]
    packed, params, targets = collate_encoded(items)
    tensors = [t for part in (packed, params, targets) for t in (part if isinstance(part, tuple) else [part])]
    assert isinstance(packed, Packed) and len(tensors) == 4 and all(isinstance(t, torch.Tensor) for t in tensors)
    got = packed.unpack()
    assert len(got) == 6 and targets.tolist() == list(range(6))
    for ((want, p), _), g, path in zip(items, got, paths):
        assert g.shape == want.shape and torch.equal(g, want), path
        assert g.untyped_storage().data_ptr() == packed.flat.untyped_storage().data_ptr()  # a view
        torch.testing.assert_close(p, params[paths.index(path)], rtol=0, atol=0)
    with open(paths[0], "rb") as f:
        assert bytes(got[0].numpy()) == f.read()
    torch.testing.assert_close(decode_augment(packed, params, 12, "cpu"),
                               decode_augment([d for (d, _), _ in items], params, 12, "cpu"), rtol=0, atol=0)


FEW_FDS = """
import resource, sys, torch
from torch.utils.data import DataLoader
sys.path.insert(0, {root!r})
from util.gpu_aug import PlanCrop, collate_encoded, decode_augment, read_encoded
paths = {paths!r}
class Files(torch.utils.data.Dataset):
    def __len__(self):
        return 2 * len(paths)
    def __getitem__(self, i):
        return PlanCrop()(read_encoded(paths[i % len(paths)])), i
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
loader = DataLoader(Files(), batch_size=len(paths), num_workers=2, collate_fn=collate_encoded)
for datas, params, targets in loader:
    out = decode_augment(datas, params, 8, "cpu")
    assert out.shape == (len(paths), 3, 8, 8) and torch.isfinite(out).all()
    print("batch", len(targets))
"""


def test_gpu_decode_batches_of_300_under_a_256_descriptor_limit(tmp_path):
    """2 loader workers, batches of 300 JPEGs, RLIMIT_NOFILE 256: both batches arrive and
    decode (a list of 300 tensors needed 300 descriptors at once: 'Too many open files')."""
    from test_data_pipeline import photo, save
    img = photo(8, 8)
    paths = [save(img, tmp_path / f"{i}.jpg", quality=50 + i % 40) for i in range(300)]
    script = tmp_path / "few_fds.py"
    script.write_text(FEW_FDS.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), paths=paths))
    import subprocess
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["batch", "300", "batch", "300"], proc.stderr[-2000:]


class CountingLoader:
    """A DataLoader stand-in of collate_encoded batches that logs when each is taken."""

    def __init__(self, batches, log):
        self.batches, self.log, self.sampler = batches, log, "the sampler"

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for k, b in enumerate(self.batches):
            self.log.append(("fetched", k))
            yield b


def encoded_batches(tmp_path, n_batches, sizes=((40, 30),)):
    """n_batches collate_encoded batches of 2 photo JPEGs per size; targets = batch number."""
    from test_data_pipeline import photo, save
    batches = []
    for b in range(n_batches):
        paths = [save(photo(w + 8 * b, h, seed=10 * b + i), tmp_path / f"{b}_{w}_{i}.jpg")
                 for w, h in sizes for i in range(2)]
        items = [PlanCrop()(read_encoded(p)) for p in paths]
        batches.append(([d for d, _ in items], torch.stack([p for _, p in items]), torch.full((len(paths),), b)))
    return batches


def decode_threads():
    import threading
    return [t for t in threading.enumerate() if t.name == "gpu-decode"]


@pytest.mark.parametrize("n_batches", [1, 4])
def test_gpu_decode_loader_decodes_one_batch_ahead_in_order(tmp_path, n_batches):
    """DeviceDecodeLoader: every batch once, in order, each equal to decode_augment of it
    (the serial path), batch k+1 fetched before batch k is handed to the step, and the
    decode thread gone at the epoch's end."""
    log, batches = [], encoded_batches(tmp_path, n_batches)
    loader = DeviceDecodeLoader(CountingLoader(batches, log), 16, "cpu")
    real_start = loader.start
    loader.start = lambda batch: log.append(("decoded", int(batch[2][0]))) or real_start(batch)
    assert len(loader) == n_batches and loader.sampler == "the sampler"
    seen = []
    for k, (images, targets) in enumerate(loader):
        assert ("fetched", min(k + 1, n_batches - 1)) in log, log  # one ahead (none after the last)
        seen.append(int(targets[0]))
        torch.testing.assert_close(images, decode_augment(*batches[k][:2], 16, "cpu"), rtol=0, atol=0)
    assert seen == list(range(n_batches))
    assert [e for e in log if e[0] == "decoded"] == [("decoded", k) for k in range(n_batches)]
    assert decode_threads() == []


def test_gpu_decode_loader_overlaps_the_decode_with_the_step(tmp_path, monkeypatch):
    """A decode that takes 50 ms and a step that takes 50 ms: about 50 ms per step, not the
    100 ms of a decode in the training thread (median of 9 steps under 80 ms; sleeps, so
    the machine's load hardly matters)."""
    import time
    import util.gpu_aug
    real = util.gpu_aug.decode_augment

    def slow_decode(*args, **kw):
        time.sleep(0.05)
        return real(*args, **kw)

    monkeypatch.setattr(util.gpu_aug, "decode_augment", slow_decode)
    batches = encoded_batches(tmp_path, 10)
    loader = DeviceDecodeLoader(CountingLoader(batches, []), 16, "cpu")
    stamps = []
    for k, (images, targets) in enumerate(loader):
        stamps.append(time.perf_counter())
        assert int(targets[0]) == k and torch.equal(images, real(*batches[k][:2], 16, "cpu"))
        time.sleep(0.05)  # the step
    per_step = np.diff(stamps)  # from one hand-over to the next: a step and the wait for the batch
    assert len(per_step) == 9 and np.median(per_step) < 0.080, per_step


@pytest.mark.parametrize("error", [UserError("cannot decode image x.jpg: bad data"), RuntimeError("nvjpeg: boom")])
def test_gpu_decode_loader_raises_the_decode_threads_error_and_ends_the_thread(tmp_path, error):
    """An error in the decode thread surfaces in the training thread as the same exception
    (a UserError stays one line), at the batch it belongs to; no thread is left behind."""
    batches = encoded_batches(tmp_path, 4)
    loader = DeviceDecodeLoader(CountingLoader(batches, []), 16, "cpu")
    real_start = loader.start

    def failing(batch):
        if int(batch[2][0]) == 2:
            raise error
        return real_start(batch)

    loader.start, seen = failing, []
    with pytest.raises(type(error)) as caught:
        for images, targets in loader:
            seen.append(int(targets[0]))
    assert caught.value is error and seen == [0, 1]
    assert decode_threads() == []


def test_gpu_decode_loader_stopping_early_ends_the_thread(tmp_path):
    """A consumer that stops mid-epoch (a save-and-exit signal, a step limit): closing the
    iterator ends the decode thread, and a batch still queued is not decoded."""
    log, batches = [], encoded_batches(tmp_path, 6)
    loader = DeviceDecodeLoader(CountingLoader(batches, log), 16, "cpu")
    real_start = loader.start
    loader.start = lambda batch: log.append(("decoded", int(batch[2][0]))) or real_start(batch)
    it = iter(loader)
    next(it)
    it.close()
    assert decode_threads() == []
    assert len([e for e in log if e[0] == "decoded"]) <= 2, log


def test_gpu_decode_batch_of_many_sizes_copies_to_the_device_once(tmp_path):
    """decode_augment of a batch with 3 image sizes: one host-to-device copy (the crop
    parameters and the grouping together; a copy per size group syncs per group on CUDA),
    and the images equal crop_resize_flip + normalise per group (the serial path's values)."""
    from torch.overrides import TorchFunctionMode
    datas, params, _ = encoded_batches(tmp_path, 1, sizes=((40, 30), (50, 30), (40, 44)))[0]
    order = [0, 3, 1, 4, 2, 5]  # interleave the sizes
    datas, params = [datas[k] for k in order], params[order]

    class Copies(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            to_device = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
            if func in (torch.Tensor.to, torch.tensor) and to_device:  # not .to(dtype)
                self.calls.append(func.__name__)
            return func(*args, **kwargs)

    norm = normalizer("cpu")  # made once by the loader, not per batch
    with Copies() as copies:
        got = decode_augment(datas, params, 16, "cpu", norm)
    assert copies.calls == ["to"], copies.calls
    from torchvision.io import ImageReadMode, decode_jpeg
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255
    imgs = [decode_jpeg(d, mode=ImageReadMode.RGB) for d in datas]
    for members in ([0, 2], [1, 4], [3, 5]):
        assert len({imgs[k].shape for k in members}) == 1
        want = crop_resize_flip(torch.stack([imgs[k] for k in members]), params[members], 16)
        assert torch.equal(got[members], (want - mean) / std)


# ---- CUDA only: run by benchmarks/gpu_acceptance.py on the GPU machine ------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
def test_cuda_nvjpeg_decode_matches_the_cpu_decode(tmp_path):
    path = odd_jpeg(tmp_path, "RGB")
    torch.manual_seed(0)
    data_, params = PlanCrop()(read_encoded(path))
    cpu = decode_augment([data_], params[None], 32, "cpu")[0]
    gpu = decode_augment([data_], params[None], 32, "cuda")[0].cpu()
    diff = (gpu - cpu).abs() * 0.226 * 255
    assert diff.mean() < 1.5 and diff.max() < 30, (diff.mean(), diff.max())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"], ids=["bfloat16", "float16"])  # CPU-side -k selections skip these
def test_cuda_training_epoch_with_exact_accumulation(amp):
    device = torch.device("cuda")
    model = tiny().to(device)
    batches = [(x.to(device), y.to(device)) for x, y in data(n_batches=4)]
    args = step_args(amp=amp, accum_iter=2, clip_grad=1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    run = RunState()
    saver = CheckpointSaver(args, model, optimizer, scaler, run, device)
    stats = train_one_epoch(model, model, batches, optimizer, scaler, device, 0, run, saver, args)
    assert np.isfinite(stats["loss"]) and optimizer.state


# ---- the default loader without simplejpeg (the GPU machine's fixed image lacks it) -----------
HIDE_SIMPLEJPEG = "import sys; sys.modules['simplejpeg'] = None\n"  # import simplejpeg -> ImportError


def test_fast_loader_without_simplejpeg_falls_back_to_pil_with_the_same_pixels(tmp_path):
    """util/jpeg.py with simplejpeg hidden (a sitecustomize in a subprocess): one warning
    line, and PIL's draft mode gives the pixels of the libjpeg-turbo path, reduced DCT
    scales included (large images, small output)."""
    from test_data_pipeline import photo, save
    from torchvision import transforms
    from util.jpeg import DecodeCrop, dct_scale
    paths = [save(photo(w, h, seed=i), tmp_path / f"{i}.jpg") for i, (w, h) in enumerate([(1023, 767), (501, 333)])]
    paths.append(save(photo(300, 200).convert("L"), tmp_path / "grey.jpg"))
    script = tmp_path / "crops.py"
    script.write_text(
        "import sys, torch\nsys.path.insert(0, sys.argv[1])\n"
        "from torchvision import transforms\nfrom util.jpeg import DecodeCrop\n"
        "crop = transforms.RandomResizedCrop(48, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC)\n"
        "out = []\nfor p in sys.argv[3:]:\n    for seed in range(6):\n"
        "        torch.manual_seed(seed); out.append(DecodeCrop(crop)(p))\n"
        "torch.save(torch.stack(out), sys.argv[2])\n")
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_SIMPLEJPEG)
    import subprocess
    from conftest import REPO
    proc = subprocess.run([sys.executable, str(script), REPO, str(tmp_path / "pil.pt"), *paths], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: simplejpeg is not installed"), proc.stderr
    crop = transforms.RandomResizedCrop(48, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC)
    want, scales = [], set()
    for p in paths:
        for seed in range(6):
            torch.manual_seed(seed)
            want.append(DecodeCrop(crop)(p))
            torch.manual_seed(seed)
            _, _, h, w = crop.get_params(torch.empty(0, *Image.open(p).size[::-1]), crop.scale, crop.ratio)
            scales.add(dct_scale(h, w, 48, 48))
    assert max(scales) > 1, scales  # reduced-scale decodes were exercised
    torch.testing.assert_close(torch.load(tmp_path / "pil.pt"), torch.stack(want), rtol=0, atol=1)


def test_fast_loader_without_simplejpeg_runs_main_pretrain(tmp_path, tiny_args):
    from test_pretrain import make_jpeg_folder
    make_jpeg_folder(tmp_path / "data")
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_SIMPLEJPEG)
    proc = run_script("main_pretrain.py", *tiny_args, "--data_path", tmp_path / "data", "--batch_size", "4",
                      "--output_dir", tmp_path / "out", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("warning: simplejpeg is not installed") == 1, proc.stderr
    assert os.path.isfile(tmp_path / "out" / "checkpoint-0.pth")


def decode_race(decode, nbytes, rounds=20, stream=None, victims=4, stall=30):
    """Rounds (of `rounds`) in which `decode()` (returns a CUDA tensor), called while
    reductions of just-freed tensors are still queued behind a long matmul chain on
    `stream` (default: the current one), changed what those reductions read, and rounds
    whose result differs from the same decode run alone. The freed tensors have nbytes,
    the size nvJPEG's output has, so the caching allocator offers their blocks to it; after
    pytorch/vision PR 9606's reproducer, with public ops only."""
    stream = stream or torch.cuda.current_stream()
    want = decode()
    torch.cuda.synchronize()
    corrupted = wrong = 0
    with torch.cuda.stream(stream):
        a = torch.randn(4096, 4096, device="cuda")
        c = torch.empty_like(a)
    for _ in range(rounds):
        with torch.cuda.stream(stream):
            bufs = [torch.full((nbytes,), k + 1, dtype=torch.uint8, device="cuda") for k in range(victims)]
            torch.cuda.synchronize()
            for _ in range(stall):  # tens of milliseconds of queued work
                torch.matmul(a, a, out=c)
            sums = [bufs[k].sum(dtype=torch.int64) for k in range(victims)]
            del bufs  # freed while the sums that read them are still queued
        got = decode()
        torch.cuda.synchronize()
        corrupted += any(s.item() != (k + 1) * nbytes for k, s in enumerate(sums))
        wrong += not torch.allclose(got.float(), want.float(), rtol=0, atol=1e-3)  # garbage is far off
    return corrupted, wrong


def race_inputs(tmp_path):
    from test_data_pipeline import photo, save
    path = save(photo(1024, 768), tmp_path / "big.jpg")
    torch.manual_seed(0)
    data_, params = PlanCrop()(read_encoded(path))
    return data_, params[None], 3 * 768 * 1024  # the bytes of the decoded image


class NoSampler:
    sampler = None


@pytest.mark.cuda
@cuda
def test_cuda_device_decode_is_safe_from_the_nvjpeg_stream_race(tmp_path):
    """DeviceDecodeLoader's decode (side stream, synchronize, event, record_stream) while
    freed blocks of the training stream, or of the side stream itself (the prefetch's own
    intermediates), are still being read: no reduction changes and the images equal a
    decode run alone. (benchmarks/gpu_acceptance.py reports the same harness on a plain
    decode_jpeg, where the race shows.)"""
    data_, params, nbytes = race_inputs(tmp_path)
    loader = DeviceDecodeLoader(NoSampler(), 224, "cuda")
    ours = lambda: loader.hand_over(loader.start(([data_], params, torch.tensor([0]))))[0]  # noqa: E731
    for stream in (None, loader.stream):
        corrupted, wrong = decode_race(ours, nbytes, stream=stream)
        assert (corrupted, wrong) == (0, 0), ("training stream" if stream is None else "side stream", corrupted, wrong)


# ---- --compile with the exact regulariser under accumulation ----------------------------------
def test_compile_exact_accumulation_feature_pass_is_compiled_and_gives_eager_gradients():
    """main_pretrain.CompiledFeatures: engine_pretrain.regulariser_grads' encoder pass
    runs compiled (dynamo makes a graph of it) and gives eager's regulariser gradients."""
    from engine_pretrain import regulariser_grads
    from main_pretrain import CompiledFeatures
    model = tiny()
    args = step_args(amp="none", accum_iter=2)
    batches = [(i, x, y, None) for i, (x, y) in enumerate(data(n_batches=2))]  # masks drawn here
    torch.manual_seed(0)
    eager = regulariser_grads(model, batches, 2, args)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    compiled = regulariser_grads(CompiledFeatures(model), batches, 2, args)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for (n_e, g_e, r_e), (n_c, g_c, r_c) in zip(eager, compiled):
        assert torch.equal(n_e, n_c)  # the same masks
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(r_c, r_e, rtol=1e-5, atol=1e-7)
