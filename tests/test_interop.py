"""Interop (main_export.py, util/interop.py): our checkpoints out to timm and Hugging Face
and back in, checked by outputs (same input, same mask noise), not by keys; the
weights-only checkpoints main_pretrain --resume takes; the reconstruction picture.
Every model is built here, tiny: nothing is downloaded."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import main_export
import models_mae
import models_vit
from conftest import REPO, TINY, assert_one_line_error, run_script
from util.datasets import eval_resize
from util.interop import hf_table

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

# ViT-Tiny width, 2 encoder blocks, a 1-block 64-wide decoder, 32 px images of 4 px patches.
SHAPE = dict(img_size=32, patch_size=4, depth=2, decoder_embed_dim=64, decoder_depth=1)
FLAGS = ["--depth", "2", "--decoder_embed_dim", "64", "--decoder_depth", "1"]
ARGS = dict(model="mae_vit_tiny_patch16", input_size=32, patch_size=4, depth=2, decoder_embed_dim=64,
            decoder_depth=1, norm_pix_loss=True, mask_ratio=0.75, global_pool=False)
ATOL = 2e-5


def perturbed(model, seed=0):
    """Every weight moved off its init (LayerNorms away from 1/0, biases non-zero), so a
    swapped or dropped tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # the fixed sin-cos position embeddings too: they are weights
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_mae(norm_pix_loss=True, global_pool=False, seed=0):
    return perturbed(models_mae.mae_vit_tiny_patch16(**SHAPE, norm_pix_loss=norm_pix_loss,
                                                     global_pool=global_pool, nb_classes=10), seed)


def save_ours(tmp_path, model, name="ckpt.pth", **args):
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 3, "args": {**ARGS, **args}}, path)
    return str(path)


def images(n=3, side=32, seed=1):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def unmasked_latent(model, x):
    """Our encoder on every patch in order (mask ratio 0 with increasing noise)."""
    noise = torch.arange(model.patch_embed.num_patches).float().expand(x.shape[0], -1)
    return model.forward_encoder(x, 0.0, noise)[0]


# ---- timm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("global_pool", [False, True])
def test_interop_timm_round_trip(tmp_path, global_pool):
    model = tiny_mae(global_pool=global_pool)
    out = str(tmp_path / "enc.safetensors")
    name, kw = main_export.export_timm(save_ours(tmp_path, model, global_pool=global_pool), out)
    assert name == "vit_tiny_patch16_224" and kw["img_size"] == 32 and kw["patch_size"] == 4
    assert kw["depth"] == 2 and kw["num_classes"] == 0 and kw["global_pool"] == ("avg" if global_pool else "token")
    tm = timm.create_model(name, **kw).eval()
    tm.load_state_dict(load_file(out))  # strict
    x = images()
    with torch.no_grad():
        latent, feats = unmasked_latent(model, x), tm.forward_features(x)
        pooled = tm.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(feats, latent, atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, latent[:, 1:].mean(1) if global_pool else latent[:, 0], atol=ATOL, rtol=0)

    # back in: the encoder, bit for bit; --finetune takes it
    back = str(tmp_path / "back.pth")
    args = main_export.import_weights(out, back)
    assert args["model"] == "mae_vit_tiny_patch16" and args["depth"] == 2 and args["decoder_depth"] is None
    sd = torch.load(back, weights_only=True)["model"]
    own = model.state_dict()
    assert set(sd) == {k for k in own if not k.startswith(("decoder_", "mask_token", "online_head."))}
    assert all(torch.equal(v, own[k]) for k, v in sd.items())
    vit = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, depth=2, num_classes=5, global_pool=False)
    models_vit.load_pretrained(vit, back, "vit_tiny_patch16")
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(x), latent, atol=ATOL, rtol=0)


@pytest.mark.parametrize("img,patch", [(32, 4), (224, 16)])
def test_interop_timm_printed_call_gives_the_training_preprocessing(tmp_path, capsys, img, patch):
    """The printed create_model call, run exactly as printed: timm's own data config is the
    training mean/std/size (not the 224 px registry name's augreg mean 0.5), the features are
    ours, and the load is strict (a wrong depth fails). The metadata has no local path."""
    import safetensors
    model = perturbed(models_mae.mae_vit_tiny_patch16(img_size=img, patch_size=patch, depth=1, decoder_embed_dim=32,
                                                      decoder_depth=1, nb_classes=10))
    ckpt = save_ours(tmp_path, model, input_size=img, patch_size=patch, depth=1)
    out = str(tmp_path / "enc.safetensors")
    capsys.readouterr()
    main_export.export_timm(ckpt, out)
    printed = capsys.readouterr().out.splitlines()
    code = "\n".join(line.strip() for line in printed[1:3])
    scope = {"timm": timm, "safetensors": safetensors}
    exec("import safetensors.torch\n" + code, scope)
    tm = scope["m"].eval()
    cfg = timm.data.resolve_model_data_config(tm)
    assert cfg["input_size"] == (3, img, img) and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    assert math.floor(img / cfg["crop_pct"]) == eval_resize(img)  # timm's resize before the centre crop = ours
    resize = [t for t in timm.data.create_transform(**cfg).transforms if type(t).__name__ == "Resize"]
    assert resize and resize[0].size == eval_resize(img)
    x = images(2, img)
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_features(x), unmasked_latent(model, x), atol=ATOL, rtol=0)
    wrong = code.replace("depth=1", "depth=2")
    assert wrong != code
    with pytest.raises(RuntimeError, match="Missing key"):
        exec("import safetensors.torch\n" + wrong, dict(scope))
    with safetensors.safe_open(out, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and json.loads(meta["input_size"]) == [3, img, img]
    assert meta["source"] == "ckpt.pth" and str(tmp_path) not in json.dumps(meta)


def test_interop_timm_fine_tuned_global_pool(tmp_path):
    vit = perturbed(models_vit.vit_tiny_patch16(img_size=32, patch_size=4, depth=2, num_classes=7, global_pool=True))
    path = tmp_path / "ft.pth"
    torch.save({"model": vit.state_dict(), "args": {"model": "vit_tiny_patch16"}}, path)
    out = str(tmp_path / "ft.safetensors")
    name, kw = main_export.export_timm(str(path), out)
    assert kw["global_pool"] == "avg" and "fc_norm" not in kw  # timm's default: fc_norm with avg
    tm = timm.create_model(name, **kw).eval()
    tm.load_state_dict(load_file(out))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_head(tm.forward_features(x), pre_logits=True),
                                   vit.forward_head(vit.forward_features(x), pre_logits=True), atol=ATOL, rtol=0)


# ---- Hugging Face -------------------------------------------------------------------------
def test_interop_hf_pretraining_parity(tmp_path):
    model = tiny_mae(norm_pix_loss=True)
    folder = str(tmp_path / "hf")
    main_export.export_hf(save_ours(tmp_path, model), folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["norm_pix_loss"] is True and cfg["mask_ratio"] == 0.75 and cfg["layer_norm_eps"] == 1e-6
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = images()
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(x, 0.75, noise), hf.eval()(pixel_values=x, noise=noise)
    torch.testing.assert_close(theirs.mask, ours.mask, atol=0, rtol=0)
    assert ours.mask.sum() == 3 * 48
    torch.testing.assert_close(theirs.logits, ours.pred, atol=ATOL, rtol=0)
    torch.testing.assert_close(theirs.loss, ours.loss, atol=ATOL, rtol=1e-5)


def test_interop_hf_encoder_parity(tmp_path):
    model = tiny_mae()
    folder = str(tmp_path / "hf")
    main_export.export_hf(save_ours(tmp_path, model), folder)
    x = images()
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(3))
    vit = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    mae = transformers.ViTMAEModel.from_pretrained(folder).eval()
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(x, 0.75, noise)
        torch.testing.assert_close(vit(pixel_values=x).last_hidden_state, unmasked_latent(model, x),
                                   atol=ATOL, rtol=0)
        out = mae(pixel_values=x, noise=noise)
    torch.testing.assert_close(out.last_hidden_state, latent, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.mask, mask, atol=0, rtol=0)

    # a fine-tuned classifier (cls token): ViTForImageClassification, and ViTModel for its features
    clf = perturbed(models_vit.vit_tiny_patch16(img_size=32, patch_size=4, depth=2, num_classes=7,
                                                global_pool=False))
    torch.save({"model": clf.state_dict(), "args": {"model": "vit_tiny_patch16"}}, tmp_path / "ft.pth")
    main_export.export_hf(str(tmp_path / "ft.pth"), str(tmp_path / "hf_clf"))
    cfg = json.load(open(tmp_path / "hf_clf" / "config.json"))
    assert cfg["architectures"] == ["ViTForImageClassification"] and len(cfg["id2label"]) == 7
    vit, info = transformers.ViTModel.from_pretrained(str(tmp_path / "hf_clf"), add_pooling_layer=False,
                                                      output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "mismatched_keys"))
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(pixel_values=x).last_hidden_state, clf.forward_features(x),
                                   atol=ATOL, rtol=0)


def linear_probe(seed=4):
    """main_linprobe's model: encoder + BatchNorm (no affine) + Linear, with running statistics
    far from 0 / 1 so that an unfolded or wrongly folded BatchNorm shows in the logits."""
    from main_linprobe import add_probe_head
    vit = add_probe_head(models_vit.vit_tiny_patch16(img_size=32, patch_size=4, depth=2, num_classes=7,
                                                     global_pool=False))
    g = torch.Generator().manual_seed(seed)
    bn = vit.head[0]
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
    bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.1)
    return perturbed(vit, seed)


def test_interop_linear_probe_exports_as_a_classifier_with_its_logits(tmp_path, capsys):
    probe = linear_probe()
    path = tmp_path / "probe.pth"
    torch.save({"model": probe.state_dict(), "args": {"model": "vit_tiny_patch16"}}, path)
    x = images()
    with torch.no_grad():
        want = probe(x)
    name, kw = main_export.export_timm(str(path), str(tmp_path / "probe.safetensors"))
    assert kw["num_classes"] == 7 and "the classifier (7 classes" in capsys.readouterr().out
    tm = timm.create_model(name, **kw).eval()
    tm.load_state_dict(load_file(str(tmp_path / "probe.safetensors")))  # strict: the head included
    main_export.export_hf(str(path), str(tmp_path / "hf_probe"))
    hf = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf_probe")).eval()
    with torch.no_grad():
        torch.testing.assert_close(tm(x), want, atol=ATOL, rtol=0)
        torch.testing.assert_close(hf(pixel_values=x).logits, want, atol=ATOL, rtol=0)


# ---- class names: from the training data to the exported classifiers ------------------------
FOLDERS = ["zebra", "apple", "kite"]  # as written; ImageFolder's labels follow the sorted names
NAMES = sorted(FOLDERS)
EVAL_TINY = ["--model", "vit_tiny_patch16", "--input_size", "16", "--patch_size", "8", "--depth", "1",
             "--batch_size", "4", "--num_workers", "0", "--warmup_epochs", "1", "--print_freq", "100"]
RUNS = {"main_linprobe.py": [], "main_finetune.py": ["--cls_token"]}  # HF has no place for fc_norm


def named_folder(root, classes, n_train=13, n_val=5):
    """train/ and val/ class folders holding a prime number of random 16 px images each,
    spread over the classes."""
    from PIL import Image
    g = torch.Generator().manual_seed(7)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / split / classes[i % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def named_runs(tmp_path_factory):
    """One epoch of main_linprobe.py and of main_finetune.py on a folder of named classes:
    {script: (data root, output_dir)}."""
    root = tmp_path_factory.mktemp("named")
    data = named_folder(root / "data", FOLDERS)
    runs = {}
    for script, extra in RUNS.items():
        out = root / script.replace(".py", "")
        proc = run_script(script, *EVAL_TINY, *extra, "--epochs", "1", "--data_path", data, "--output_dir", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[script] = data, out
    return runs


@pytest.mark.parametrize("script", RUNS)
def test_interop_probe_and_finetune_checkpoints_hold_the_class_names(named_runs, script):
    _, out = named_runs[script]
    saved = sorted(p.name for p in out.glob("checkpoint-*.pth"))
    assert saved == ["checkpoint-0.pth", "checkpoint-best.pth"]
    for name in saved:  # plain data: the weights-only load takes it
        assert torch.load(out / name, weights_only=True)["classes"] == NAMES


@pytest.mark.parametrize("script", RUNS)
def test_interop_classifier_exports_carry_the_class_names(named_runs, script, tmp_path, capsys):
    """HF: config.id2label / label2id by index, and the image-classification pipeline answers
    with the names; timm: the printed call, run as printed, has them in pretrained_cfg
    label_names, and the safetensors metadata holds them as JSON."""
    import safetensors
    from PIL import Image
    ckpt = str(named_runs[script][1] / "checkpoint-best.pth")
    folder = str(tmp_path / "hf")
    main_export.export_hf(ckpt, folder)
    assert "3 classes, named in id2label" in capsys.readouterr().out
    hf = transformers.ViTForImageClassification.from_pretrained(folder)
    assert hf.config.id2label == dict(enumerate(NAMES)) and hf.config.label2id == {n: i for i, n in enumerate(NAMES)}
    classify = transformers.pipeline("image-classification", model=folder, device="cpu")
    answer = classify(Image.new("RGB", (16, 16), (90, 30, 200)), top_k=3)
    assert sorted(a["label"] for a in answer) == NAMES

    out = str(tmp_path / "clf.safetensors")
    main_export.export_timm(ckpt, out)
    printed = capsys.readouterr().out.splitlines()
    assert "3 classes, named in label_names" in printed[0]
    assert len(printed) == 5 and all("zebra" not in line for line in printed)  # names read back, not printed
    scope = {"timm": timm, "safetensors": safetensors, "json": json}
    exec("import safetensors.torch\n" + "\n".join(line.strip() for line in printed[1:4]), scope)
    assert scope["m"].pretrained_cfg["label_names"] == tuple(NAMES)
    with safetensors.safe_open(out, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["label_names"]) == NAMES
    # the recorded create_model arguments build the same model, names and all
    again = timm.create_model(meta["timm_model"], **json.loads(meta["timm_kwargs"]))
    assert tuple(again.pretrained_cfg["label_names"]) == tuple(NAMES)


def test_interop_class_names_that_do_not_fit_the_head_are_one_line(named_runs, tmp_path):
    state = torch.load(named_runs["main_linprobe.py"][1] / "checkpoint-best.pth", weights_only=True)
    torch.save({**state, "classes": NAMES[:2]}, tmp_path / "two.pth")
    for fmt, out in (("hf", tmp_path / "hf"), ("timm", tmp_path / "clf.safetensors")):
        proc = run_script("main_export.py", "--checkpoint", tmp_path / "two.pth", "--format", fmt, "--output", out)
        assert_one_line_error(proc, "names 2 classes but its head has 3 outputs")
        assert not os.path.exists(out)


@pytest.mark.parametrize("script", RUNS)
def test_resume_keeps_the_class_names_and_refuses_other_classes(named_runs, script, tmp_path):
    """Resumed on the same folder, the next epoch's checkpoint names the classes; on a folder
    of as many classes but one other name, label 1 would be another class: one line."""
    data, out = named_runs[script]
    resume = ["--resume", out / "checkpoint-0.pth", "--epochs", "2", *RUNS[script]]
    proc = run_script(script, *EVAL_TINY, *resume, "--data_path", data, "--output_dir", tmp_path / "same")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting at epoch 1" in proc.stdout
    assert torch.load(tmp_path / "same" / "checkpoint-1.pth", weights_only=True)["classes"] == NAMES
    other = named_folder(tmp_path / "other", ["zebra", "apple", "lion"])  # apple, lion, zebra
    proc = run_script(script, *EVAL_TINY, *resume, "--data_path", other, "--output_dir", tmp_path / "other_run")
    assert_one_line_error(proc, "trained on other classes: label 1 is 'kite' in the checkpoint, 'lion' in this dataset;")
    assert not list((tmp_path / "other_run").glob("checkpoint-*.pth"))


def test_interop_hf_folder_has_the_training_preprocessing(tmp_path):
    """AutoImageProcessor loads the exported folder (Hub ViTMAE folders ship a
    preprocessor_config.json) with our mean/std and size, and its pixel_values through
    ViTModel give our features."""
    from PIL import Image
    from torchvision import transforms
    model = tiny_mae()
    folder = str(tmp_path / "hf")
    main_export.export_hf(save_ours(tmp_path, model), folder)
    proc = transformers.AutoImageProcessor.from_pretrained(folder)
    assert list(proc.image_mean) == [0.485, 0.456, 0.406] and list(proc.image_std) == [0.229, 0.224, 0.225]
    assert proc.size == {"height": 32, "width": 32}
    g = torch.Generator().manual_seed(5)
    img = Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy())
    ours = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406),
                                                                           (0.229, 0.224, 0.225))])(img)[None]
    pixels = proc(images=img, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, ours, atol=1e-5, rtol=0)
    vit = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit(pixel_values=pixels).last_hidden_state, unmasked_latent(model, ours),
                                   atol=ATOL, rtol=0)


def eval_md_block(needle):
    """The python block of EVAL.md that contains `needle`, as it stands."""
    import re
    text = open(os.path.join(REPO, "EVAL.md")).read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if needle in b]
    assert len(blocks) == 1, needle
    return blocks[0]


def with_statement_replaced(code, prefix, new):
    """`code` with the (multi-line) statement that starts with `prefix` replaced by `new`."""
    import ast
    stmt = [n for n in ast.parse(code).body if ast.get_source_segment(code, n).startswith(prefix)]
    assert len(stmt) == 1, prefix
    lines = code.splitlines()
    return "\n".join(lines[:stmt[0].lineno - 1] + [new] + lines[stmt[0].end_lineno:]) + "\n"


def test_interop_eval_md_feature_code_gives_our_features_quietly(tmp_path, capsys):
    """EVAL.md's timm and transformers code, run as it stands in a fresh interpreter (the
    paths, and for timm the create_model call a tiny export prints, put in): tokens and
    features are our encoder's on every patch in order (ViTModel, and ViTMAEModel at mask
    ratio 0 with increasing noise: not shuffled), and nothing at all is printed (no type
    warning, no load report of the decoder's tensors, no progress bar)."""
    model = tiny_mae()
    ckpt = save_ours(tmp_path, model)
    main_export.export_hf(ckpt, str(tmp_path / "hf"))
    capsys.readouterr()
    main_export.export_timm(ckpt, str(tmp_path / "enc.safetensors"))
    call = capsys.readouterr().out.splitlines()[1].strip()
    timm_code = with_statement_replaced(eval_md_block("timm.create_model"), "m = timm.create_model", call)
    timm_code = timm_code.replace('"mmae.safetensors"', repr(str(tmp_path / "enc.safetensors")))
    hf_code = eval_md_block("ViTMAEModel.from_pretrained").replace('"mmae_hf"', repr(str(tmp_path / "hf")))
    assert repr(str(tmp_path / "hf")) in hf_code and "enc.safetensors" in timm_code
    g = torch.Generator().manual_seed(9)  # 40 px images: timm's transform resizes and crops them to 32
    torch.save(torch.randint(0, 256, (2, 40, 40, 3), generator=g, dtype=torch.uint8), tmp_path / "img.pt")
    prelude = ("import PIL.Image, torch\n"
               f"pil_images = [PIL.Image.fromarray(a.numpy()) for a in torch.load({str(tmp_path / 'img.pt')!r})]\n")
    save = (f"torch.save(dict(x=timm_x, tokens=timm_tokens, feats=timm_feats, pixels=pixels, vit=feats, "
            f"mae=feats_mae), {str(tmp_path / 'out.pt')!r})\n")
    script = (prelude + timm_code + "timm_x, timm_tokens, timm_feats = x, tokens, feats\n" + hf_code + save)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout + proc.stderr == "", (proc.stdout + proc.stderr)[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(out["tokens"], unmasked_latent(model, out["x"]), atol=ATOL, rtol=0)
        ours = unmasked_latent(model, out["pixels"])
    torch.testing.assert_close(out["feats"], out["tokens"][:, 0], atol=0, rtol=0)
    torch.testing.assert_close(out["vit"], ours, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["mae"], ours, atol=ATOL, rtol=0)


def hf_pretraining_model(seed=4):
    """An HF ViTMAEForPreTraining of SHAPE, built and saved by transformers itself."""
    cfg = transformers.ViTMAEConfig(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768, image_size=32,
        patch_size=4, decoder_hidden_size=64, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
        decoder_intermediate_size=256, layer_norm_eps=1e-6, norm_pix_loss=False, mask_ratio=0.75)
    torch.manual_seed(seed)
    return perturbed(transformers.ViTMAEForPreTraining(cfg), seed)


def test_interop_hf_import_matches_and_resumes_pretraining(tmp_path):
    hf = hf_pretraining_model()
    hf.save_pretrained(tmp_path / "hf")
    imported = tmp_path / "imported.pth"
    proc = run_script("main_export.py", "--import_from", tmp_path / "hf", "--output", imported)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--depth 2 --decoder_embed_dim 64 --decoder_depth 1" in proc.stdout
    state = torch.load(imported, weights_only=True)
    assert state["args"]["model"] == "mae_vit_tiny_patch16" and state["args"]["norm_pix_loss"] is False
    ours = models_mae.mae_vit_tiny_patch16(**SHAPE, nb_classes=10).eval()
    missing, unexpected = ours.load_state_dict(state["model"], strict=False)
    assert sorted(missing) == ["online_head.bias", "online_head.weight"] and not unexpected
    x = images()
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ours(x, 0.75, noise), hf(pixel_values=x, noise=noise)
    torch.testing.assert_close(a.mask, b.mask, atol=0, rtol=0)
    torch.testing.assert_close(a.pred, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=1e-5)

    # main_pretrain --resume continues pretraining from it, with a new online head
    out = tmp_path / "run"
    proc = run_script("main_pretrain.py", *TINY, *FLAGS, "--resume", imported, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has no online head: a new one starts" in proc.stdout and "loaded weights from" in proc.stdout
    after = torch.load(out / "checkpoint-0.pth", weights_only=True)["model"]
    assert set(after) == set(ours.state_dict())

    # and the export of the imported checkpoint is the HF model again
    main_export.export_hf(str(imported), str(tmp_path / "again"))
    again = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x, noise=noise).logits, b.logits, atol=ATOL, rtol=0)


def hf_state(folder, cls):
    model = cls.from_pretrained(folder)
    return {k: v for k, v in model.state_dict().items()}


def assert_same_tensors(a, b):
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_interop_hf_encoder_only_folder_imports_and_round_trips(tmp_path):
    """A ViTMAEModel folder (no decoder tensors) whose config keeps HF's decoder defaults
    (16 decoder heads, 512 wide: nothing at ViT-Tiny) imports: the decoder settings describe
    nothing it holds. Back out, the tensors are the folder's bit for bit."""
    cfg = transformers.ViTMAEConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                                    intermediate_size=768, image_size=32, patch_size=4, layer_norm_eps=1e-6,
                                    mask_ratio=0.0)
    torch.manual_seed(6)
    hf = perturbed(transformers.ViTMAEModel(cfg), 6)
    hf.save_pretrained(tmp_path / "enc")
    assert json.load(open(tmp_path / "enc" / "config.json"))["decoder_num_attention_heads"] == 16
    args = main_export.import_weights(str(tmp_path / "enc"), str(tmp_path / "enc.pth"))
    assert args["decoder_depth"] is None and args["mask_ratio"] == 0.0
    sd = torch.load(tmp_path / "enc.pth", weights_only=True)["model"]
    ours = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4, depth=2).eval()
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("decoder_", "mask_token", "online_head.")) for k in missing)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(unmasked_latent(ours, x), hf(pixel_values=x, noise=torch.arange(64).expand(3, -1))
                                   .last_hidden_state, atol=ATOL, rtol=0)
    main_export.export_hf(str(tmp_path / "enc.pth"), str(tmp_path / "back"))
    assert_same_tensors(hf_state(tmp_path / "back", transformers.ViTMAEModel), hf.state_dict())


def test_interop_hf_non_default_decoder_imports_resumes_and_round_trips(tmp_path):
    """A ViTMAEForPreTraining whose decoder is not the registry's (8 heads, not 4; MLP 2x, not
    4x; 2 blocks; 64 wide) and which trains at mask ratio 0.5 with norm_pix_loss: the import
    takes the decoder's shape from the config, the checkpoint's args and the printed --resume
    command carry it and the mask ratio, main_pretrain --resume as printed builds that model
    (without the head count, one line), and the export gives the folder's tensors back."""
    cfg = transformers.ViTMAEConfig(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768, image_size=32,
        patch_size=4, decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=8,
        decoder_intermediate_size=128, layer_norm_eps=1e-6, norm_pix_loss=True, mask_ratio=0.5)
    torch.manual_seed(7)
    hf = perturbed(transformers.ViTMAEForPreTraining(cfg), 7)
    hf.save_pretrained(tmp_path / "hf")
    imported = tmp_path / "imported.pth"
    proc = run_script("main_export.py", "--import_from", tmp_path / "hf", "--output", imported)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = [line.split() for line in proc.stdout.splitlines() if "main_pretrain.py --resume" in line][0]
    flags = printed[printed.index("--model"):printed.index("...")]
    assert " ".join(flags).endswith("--decoder_depth 2 --decoder_num_heads 8 --decoder_mlp_ratio 2.0 "
                                    "--mask_ratio 0.5 --norm_pix_loss")
    args = torch.load(imported, weights_only=True)["args"]
    assert (args["decoder_num_heads"], args["decoder_mlp_ratio"], args["mask_ratio"], args["norm_pix_loss"]) == \
        (8, 2.0, 0.5, True)
    ours = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4, depth=2, decoder_embed_dim=64, decoder_depth=2,
                                           decoder_num_heads=8, decoder_mlp_ratio=2.0, norm_pix_loss=True).eval()
    missing, _ = ours.load_state_dict(torch.load(imported, weights_only=True)["model"], strict=False)
    assert sorted(missing) == ["online_head.bias", "online_head.weight"]
    x, noise = images(), torch.rand(3, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a, b = ours(x, 0.5, noise), hf(pixel_values=x, noise=noise)
    torch.testing.assert_close(a.mask, b.mask, atol=0, rtol=0)
    torch.testing.assert_close(a.pred, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=1e-5)

    main_export.export_hf(str(imported), str(tmp_path / "back"))
    back = json.load(open(tmp_path / "back" / "config.json"))
    assert {k: back[k] for k in ("decoder_num_attention_heads", "decoder_intermediate_size", "mask_ratio",
                                 "norm_pix_loss")} == dict(decoder_num_attention_heads=8, decoder_intermediate_size=128,
                                                          mask_ratio=0.5, norm_pix_loss=True)
    assert_same_tensors(hf_state(tmp_path / "back", transformers.ViTMAEForPreTraining), hf.state_dict())

    tiny = TINY[TINY.index("--batch_size"):]  # TINY less its model and shape: the printed flags give them
    proc = run_script("main_pretrain.py", *tiny, "--resume", imported, *flags, "--output_dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = torch.load(tmp_path / "run" / "checkpoint-0.pth", weights_only=True)["args"]
    assert (saved["decoder_num_heads"], saved["mask_ratio"], saved["norm_pix_loss"]) == (8, 0.5, True)
    assert "warning" not in proc.stdout
    # the printed command without its objective flags: trains at 0.75 on raw pixels, but says so
    proc = run_script("main_pretrain.py", *tiny, "--resume", imported, *flags[:flags.index("--mask_ratio")],
                      "--output_dir", tmp_path / "run3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: checkpoint {imported} was trained with --mask_ratio 0.5, this run uses 0.75: pass " \
           "--mask_ratio to keep the checkpoint's" in proc.stdout
    assert f"warning: checkpoint {imported} was trained with --norm_pix_loss True, this run uses False" in proc.stdout
    heads = flags.index("--decoder_num_heads")
    proc = run_script("main_pretrain.py", *tiny, "--resume", imported, *flags[:heads], *flags[heads + 2:],
                      "--output_dir", tmp_path / "run2")
    assert_one_line_error(proc, "8 decoder heads", "--decoder_num_heads 8")


def test_interop_hf_import_refuses_zero_position_embeddings(tmp_path, capsys):
    """transformers 5 builds ViTMAEForPreTraining(config) with all-zero position embeddings;
    ours are the fixed sin-cos table (never trained), so such an import would pretrain with
    no position information: refused in one line, nothing written."""
    cfg = hf_pretraining_model().config
    fresh = transformers.ViTMAEForPreTraining(cfg)
    if fresh.vit.embeddings.position_embeddings.any():  # transformers 4.x fills in the sin-cos table
        with torch.no_grad():
            fresh.vit.embeddings.position_embeddings.zero_()
    fresh.save_pretrained(tmp_path / "fresh")
    line = export_error(capsys, "--import_from", tmp_path / "fresh", "--output", tmp_path / "o.pth")
    assert "all-zero position embeddings (pos_embed" in line
    assert not (tmp_path / "o.pth").exists()


def test_interop_timm_export_refuses_a_pth_name(tmp_path, capsys):
    """--format timm writes safetensors: under a .pth name the importer (and torch.load) would
    read a torch.save file and call it corrupt, so the name is refused in one line."""
    good = save_ours(tmp_path, tiny_mae())
    line = export_error(capsys, "--checkpoint", good, "--format", "timm", "--output", tmp_path / "x.pth")
    assert "*.safetensors" in line and not (tmp_path / "x.pth").exists()


def test_interop_hf_table_is_one_to_one():
    table = hf_table(2, 1)
    names = [k for t in table.values() for k in (t if isinstance(t, tuple) else (t,))]
    assert len(names) == len(set(names))
    ours = models_mae.mae_vit_tiny_patch16(**SHAPE).state_dict()
    assert set(table) == {k for k in ours if not k.startswith("online_head.")}


# ---- official MAE files and main_pretrain --resume (issue 24) ----------------------------------
def test_interop_official_full_checkpoint_resumes_and_encoder_only_refused(tmp_path):
    sd = models_mae.mae_vit_tiny_patch16(**SHAPE).state_dict()
    full = {"model": {k: v for k, v in sd.items() if not k.startswith("online_head.")}}  # *_full.pth
    torch.save(full, tmp_path / "mae_pretrain_vit_tiny_full.pth")
    proc = run_script("main_pretrain.py", *TINY, *FLAGS, "--resume", tmp_path / "mae_pretrain_vit_tiny_full.pth",
                      "--output_dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has no online head: a new one starts" in proc.stdout
    assert (tmp_path / "run" / "checkpoint-0.pth").is_file()

    enc = {"model": {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token", "online_head."))}}
    torch.save(enc, tmp_path / "mae_pretrain_vit_tiny.pth")
    proc = run_script("main_pretrain.py", *TINY, *FLAGS, "--resume", tmp_path / "mae_pretrain_vit_tiny.pth",
                      "--output_dir", tmp_path / "run2")
    assert_one_line_error(proc, "encoder only", "--finetune")
    assert not (tmp_path / "run2").exists() or not os.listdir(tmp_path / "run2")


# ---- bad input: one line, nothing overwritten ----------------------------------------------
def export_error(capsys, *argv):
    capsys.readouterr()  # what came before (transformers' progress bars)
    with pytest.raises(SystemExit) as e:
        main_export.main(main_export.get_args_parser().parse_args([str(a) for a in argv]))
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_interop_bad_inputs(tmp_path, capsys):
    model = tiny_mae()
    good = save_ours(tmp_path, model)
    # a checkpoint of the wrong kind
    torch.save({"optimizer": {}, "epoch": 1}, tmp_path / "opt.pth")
    assert "no 'model' entry" in export_error(capsys, "--checkpoint", tmp_path / "opt.pth", "--format", "timm",
                                              "--output", tmp_path / "o1.safetensors")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "mlp.pth")
    assert "no ViT encoder" in export_error(capsys, "--checkpoint", tmp_path / "mlp.pth", "--format", "hf",
                                            "--output", tmp_path / "o2")
    # a shape the target cannot express: a global-pool classifier's fc_norm in HF's ViT
    vit = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, depth=2, num_classes=7, global_pool=True)
    torch.save({"model": vit.state_dict()}, tmp_path / "ft.pth")
    assert "fc_norm" in export_error(capsys, "--checkpoint", tmp_path / "ft.pth", "--format", "hf",
                                     "--output", tmp_path / "o3")
    # ... or an HF config models_mae cannot build (6 heads at ViT-Tiny width)
    hf = hf_pretraining_model()
    hf.config.num_attention_heads = 6
    hf.save_pretrained(tmp_path / "hf6")
    assert "num_attention_heads 6 (needs 3)" in export_error(capsys, "--import_from", tmp_path / "hf6",
                                                             "--output", tmp_path / "o4.pth")
    # an import of the wrong kind
    (tmp_path / "empty").mkdir()
    assert "without config.json" in export_error(capsys, "--import_from", tmp_path / "empty", "--output", tmp_path / "o7")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    assert "'bert'" in export_error(capsys, "--import_from", tmp_path / "bert", "--output", tmp_path / "o8")
    assert "does not exist" in export_error(capsys, "--import_from", tmp_path / "nothing", "--output", tmp_path / "o9")
    assert "either --checkpoint" in export_error(capsys, "--output", tmp_path / "o10")
    # an unknown model size
    odd = models_mae.MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=256, depth=1, num_heads=4,
                                          decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
    torch.save({"model": odd.state_dict()}, tmp_path / "odd.pth")
    assert "unknown model size" in export_error(capsys, "--checkpoint", tmp_path / "odd.pth", "--format", "timm",
                                                "--output", tmp_path / "o5.safetensors")
    # an existing output is never replaced
    (tmp_path / "taken.safetensors").write_text("mine")
    assert "already exists" in export_error(capsys, "--checkpoint", good, "--format", "timm",
                                            "--output", tmp_path / "taken.safetensors")
    assert (tmp_path / "taken.safetensors").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o") and p[1:2].isdigit()]
    # and from the command line, one line too
    assert_one_line_error(run_script("main_export.py", "--checkpoint", tmp_path / "odd.pth", "--format", "hf",
                                     "--output", tmp_path / "o6"), "unknown model size")


# ---- the reconstruction picture ------------------------------------------------------------
class Labelled(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)


def test_reconstruction_picks_span_classes():
    from util.vis import pick_across_classes
    sorted_100 = Labelled([c for c in range(100) for _ in range(50)])  # an ImageFolder's val split
    picks = pick_across_classes(sorted_100)
    assert [sorted_100.targets[i] for i in picks] == [0, 12, 25, 37, 50, 62, 75, 87]
    assert pick_across_classes(sorted_100) == picks  # the same every run
    three = Labelled([i % 3 for i in range(30)])  # fewer classes than pictures: each class in turn
    assert [three.targets[i] for i in pick_across_classes(three)] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert len(set(pick_across_classes(three))) == 8
    unlabelled = torch.utils.data.TensorDataset(torch.zeros(15, 1))
    assert pick_across_classes(unlabelled) == [0, 2, 4, 6, 8, 10, 12, 14]


def test_reconstruction_grid_enlarges_small_images(tmp_path):
    from util.vis import MIN_SIDE, reconstruction_grid, save_reconstructions
    model = models_mae.mae_vit_tiny_patch16(img_size=64, patch_size=8, depth=1, decoder_depth=1)
    x = images(2, side=64)
    grid = reconstruction_grid(model, x, 0.75)
    side = 64 * -(-MIN_SIDE // 64)  # 192: a whole multiple, nearest, so patch edges stay sharp
    assert grid.shape == (3, 2 * (side + 2) + 2, 4 * (side + 2) + 2)
    cell = grid[:, 2:2 + side, 2:2 + side]  # the first original, 3x: every pixel a 3x3 block
    torch.testing.assert_close(cell, cell[:, ::3, ::3].repeat_interleave(3, 1).repeat_interleave(3, 2))
    assert reconstruction_grid(models_mae.mae_vit_tiny_patch16(img_size=224, depth=1, decoder_depth=1),
                               images(1, side=224), 0.75).shape[-1] == 4 * 226 + 2  # large ones as they are
    assert os.path.isfile(save_reconstructions(model, x, 0.75, str(tmp_path), 0))


def test_interop_training_imports_neither_transformers_nor_the_exporter():
    code = ("import sys, main_pretrain, main_finetune, main_linprobe, main_analyze; "
            "print(sorted(m for m in ('transformers', 'main_export') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_interop_hf_encoder_only_export_keeps_every_patch(tmp_path, capsys):
    """An encoder alone is for features: its ViTMAEModel folder keeps every patch (mask_ratio 0),
    so AutoModel's cls feature is ours on every call, and the printed load is ViTModel's."""
    mae = tiny_mae()
    sd = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token", "online"))}
    path = tmp_path / "enc.pth"
    torch.save({"model": sd, "args": {**ARGS, "decoder_depth": None}}, path)
    folder = str(tmp_path / "hf enc")
    main_export.export_hf(str(path), folder)
    printed = capsys.readouterr().out
    assert "mask_ratio 0.0" in printed
    assert f"transformers.ViTModel.from_pretrained({folder!r}, add_pooling_layer=False)" in printed
    model = transformers.AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "ViTMAEModel" and model.config.mask_ratio == 0.0
    x = images()
    with torch.no_grad():
        a, b = (model(pixel_values=x).last_hidden_state for _ in range(2))
        ours = unmasked_latent(mae, x)
    assert a.shape == ours.shape
    torch.testing.assert_close(a[:, 0], ours[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(b[:, 0], a[:, 0], atol=ATOL, rtol=0)


def test_interop_import_notes_other_preprocessing_and_takes_the_flags(tmp_path, capsys):
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                                 image_size=32, patch_size=4, layer_norm_eps=1e-6)
    torch.manual_seed(2)
    perturbed(transformers.ViTModel(cfg, add_pooling_layer=False), 2).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")  # 0.5
    args = main_export.import_weights(str(tmp_path / "vit"), str(tmp_path / "vit.pth"), True, 0.6)
    out = capsys.readouterr().out
    assert "normalises with mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in out and "ImageNet's" in out
    assert (args["norm_pix_loss"], args["mask_ratio"]) == (True, 0.6)
    assert torch.load(tmp_path / "vit.pth", weights_only=True)["args"]["mask_ratio"] == 0.6
    # ImageNet's own: nothing to say
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path / "vit")
    main_export.import_weights(str(tmp_path / "vit"), str(tmp_path / "vit2.pth"))
    assert "normalises" not in capsys.readouterr().out


def test_interop_bad_export_and_import_input_is_one_line(tmp_path):
    ckpt = save_ours(tmp_path, tiny_mae())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text('{"model_type": "vit", "hidden_size": 192}')
    (tmp_path / "afile").write_text("x")
    timm_file = tmp_path / "enc.safetensors"
    main_export.export_timm(ckpt, str(timm_file))
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                                 image_size=32, patch_size=4)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    cases = [
        (["--import_from", timm_file, "--output", tmp_path / "y.safetensors"], "name --output"),
        (["--import_from", tmp_path / "bad", "--output", tmp_path / "b.pth"], "is not valid JSON"),
        (["--import_from", tmp_path / "short", "--output", tmp_path / "s.pth"],
         "does not say num_hidden_layers, image_size, patch_size"),
        (["--import_from", timm_file, "--output", ""], "--output is empty"),
        (["--import_from", timm_file, "--output", tmp_path / "afile" / "x.pth"], "cannot make its folder"),
        (["--checkpoint", ckpt, "--format", "timm", "--mask_ratio", "0.5", "--output", tmp_path / "t.safetensors"],
         "a timm file keeps only the encoder"),
        (["--checkpoint", tmp_path / "bad", "--format", "timm", "--output", tmp_path / "u.safetensors"],
         "is a folder (a Hugging Face model?)"),
        (["--checkpoint", timm_file, "--format", "hf", "--output", tmp_path / "hf"], "is a safetensors file"),
        (["--import_from", tmp_path / "vit" / "model.safetensors", "--output", tmp_path / "v.pth"],
         "import the folder that holds it"),
    ]
    for flags, fragment in cases:
        assert_one_line_error(run_script("main_export.py", *flags), fragment)
    assert sorted(os.listdir(tmp_path)) == ["afile", "bad", "ckpt.pth", "enc.safetensors", "short", "vit"]
    for finetune, fragment in ((tmp_path / "bad", "is a folder"), (timm_file, "is a safetensors file")):
        proc = run_script("main_linprobe.py", "--model", "vit_tiny_patch16", "--input_size", "32", "--patch_size",
                          "4", "--synthetic_size", "32", "--batch_size", "8", "--num_workers", "0", "--finetune", finetune,
                          "--output_dir", tmp_path / "probe")
        assert_one_line_error(proc, fragment, "--import_from")


def test_interop_hf_export_of_a_global_pool_pretraining_says_its_pooling(tmp_path, capsys):
    path = save_ours(tmp_path, tiny_mae(global_pool=True), global_pool=True)
    main_export.export_hf(path, str(tmp_path / "hf"))
    assert "was pretrained with --global_pool: its feature is the mean of last_hidden_state[:, 1:]" \
        in capsys.readouterr().out
    main_export.export_hf(save_ours(tmp_path, tiny_mae(), name="cls.pth"), str(tmp_path / "hf2"))
    assert "global_pool" not in capsys.readouterr().out
