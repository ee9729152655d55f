"""Pretrain a masked autoencoder: MAE, U-MAE (--reg uniformity) or M-MAE (--reg tcr).

    python main_pretrain.py                        # CPU demo on synthetic data
    torchrun --nproc_per_node 8 main_pretrain.py --data_path /imagenet ...
"""
if __name__ == "__main__":  # first: SLURM's TERM/USR1 during the imports below (seconds) ask for a checkpoint
    from util import preempt  # instead of killing the run (preempt imports no torch)
    preempt.install_handlers()
import argparse
import datetime
import json
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import models_mae
from engine_pretrain import exact_accumulation, train_one_epoch
from loss_func import REG_ALIASES, REG_CHOICES
from monitors.diagnostics import log_diagnostics
from monitors.online import evaluate_online
from monitors.probe import LINEAR_EPOCHS, probe_monitor
from util import checkpoint as ckpt
from util import preempt
from util.amp import grad_scaler, set_tf32
from util.cli import Parser, add_bool, add_common_args, check_common_args, resolve_num_workers, seed_everything
from util.datasets import (KeptSubset, build_dataset, build_train_set, check_nb_classes, check_same_classes,
                           eval_loader, eval_transform, held_out, on_device, pretrain_transform, readable_subset,
                           skipped_images, train_loader, train_source)
from util.dist import cleanup, get_rank, get_world_size, init_distributed_mode
from util.errors import UserError, exit_on_user_error
from util.gpu_aug import DeviceDecodeLoader, PlanCrop, collate_encoded, read_encoded
from util.metric_logger import append_log, tensorboard_writer
from util.optim import adamw, scale_lr
from util.shards import is_shard_split
from util.survival import run_with_retries
from util.vis import pick_across_classes, save_reconstructions

# Model-shape overrides of the registry size (e.g. a 6-block encoder with a 2-block decoder;
# an imported HF decoder's head count and MLP width).
SHAPE_FLAGS = ("depth", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
PUBLISHED_LAMB = 1e-2  # U-MAE's and M-MAE's --lamb


def get_args_parser():
    parser = Parser("MAE / U-MAE / M-MAE pretraining", add_help=True)
    add_common_args(parser, batch_size=64, epochs=400, input_size=224)
    parser.set_defaults(blr=1.5e-4, warmup_epochs=40)
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="mae_vit_large_patch16", help=", ".join(models_mae.MODELS))
    g.add_argument("--patch_size", default=None, type=int, help="override the model's patch size")
    for name in SHAPE_FLAGS:
        g.add_argument(f"--{name}", default=None, type=int, help=f"override the model's {name}")
    g.add_argument("--decoder_mlp_ratio", default=None, type=float, help="override the decoder's MLP width / its width")
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    g.add_argument("--clip_grad", default=None, type=float,
                   help="clip the gradient norm (off by default, as MAE's pretraining)")
    add_bool(g, "--norm_pix_loss", False, "reconstruct per-patch normalised pixels")
    add_bool(g, "--global_pool", False, "regularise/probe the mean patch token instead of cls")
    add_bool(g, "--compile", False, "torch.compile the model")
    add_bool(parser.add_argument_group("data"), "--gpu_decode", False,
             "workers only read JPEG files; decode (nvjpeg on CUDA) and augment on --device "
             "(util/gpu_aug.py): for when the CPU cores can't keep up with the GPU")
    g = parser.add_argument_group("regulariser")
    g.add_argument("--reg", default="none",
                   help="none | uniformity (U-MAE) | tcr (M-MAE); published spellings spectral, square, TCR")
    g.add_argument("--lamb", default=None, type=float,
                   help=f"weight of the regulariser (default: the published {PUBLISHED_LAMB:g} with --reg "
                        "uniformity|tcr, 0 with --reg none)")
    g.add_argument("--uniformity_mu", default=1.0, type=float, help="mu of the TCR term")
    add_bool(g, "--centering", False, "centre the features in the TCR term")
    g.add_argument("--accum_reg", default="exact", choices=["exact", "micro"],
                   help="with --accum_iter > 1: the regulariser on the whole effective batch, its gradient "
                        "exact (one extra encoder forward per micro-batch), or on each micro-batch alone")
    g = parser.add_argument_group("monitoring")
    g.add_argument("--val_interval", default=10, type=int,
                   help="online probe top-1/top-5 on the val split every N epochs (0 = never)")
    g.add_argument("--vis_every", default=10, type=int, help="reconstruction picture every N epochs (0 = never)")
    g.add_argument("--diag_images", default=1024, type=int, help="val images for the feature diagnostics (0 = off)")
    add_bool(g, "--knn_monitor", False, "kNN accuracy (train bank, eval transform) at every val_interval")
    g.add_argument("--probe_data", default=None,
                   help="a small labelled set (ImageFolder root with train/ and val/, or train/ alone: "
                        "--holdout of it is val; its shards, or a labelled file list): kNN and linear-classifier "
                        "accuracy on it at every val_interval, e.g. while pretraining on an unlabeled --data_path")
    return parser


def check_pretrain_args(args):
    """Fail early on values that cannot work; returns notes for the start of the log
    (a default that changes the experiment is said, not silent)."""
    notes = []
    args.reg = REG_ALIASES.get(args.reg, args.reg)
    if args.reg not in REG_CHOICES:
        raise UserError(f"unknown --reg {args.reg!r}; choose from {', '.join(REG_CHOICES)} "
                        f"(or {', '.join(REG_ALIASES)})")
    if args.lamb is None:
        args.lamb = 0.0 if args.reg == "none" else PUBLISHED_LAMB
        if args.reg != "none":
            notes.append(f"--reg {args.reg} without --lamb: using the published lamb {PUBLISHED_LAMB:g}")
    elif args.lamb == 0 and args.reg != "none":
        notes.append(f"--reg {args.reg} with --lamb 0: the regulariser is not computed (plain MAE; loss_reg logs 0)")
    if args.lamb < 0:
        raise UserError(f"--lamb must be >= 0, got {args.lamb}")
    if args.uniformity_mu <= 0:
        raise UserError(f"--uniformity_mu must be > 0, got {args.uniformity_mu}")
    if not 0 <= args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.probe_data is not None and not os.path.exists(args.probe_data):
        raise UserError(f"--probe_data {args.probe_data} does not exist")
    if args.model not in models_mae.MODELS:
        raise UserError(f"unknown --model {args.model}; choose from {', '.join(models_mae.MODELS)}")
    return notes


def check_args(args):
    """Every flag check that needs no process group (submit_slurm.py runs it too)."""
    return check_common_args(args) + check_pretrain_args(args)


def build_model(args):
    kwargs = dict(img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                  nb_classes=args.nb_classes, global_pool=args.global_pool)
    kwargs.update({k: getattr(args, k) for k in ("patch_size", "decoder_mlp_ratio") + SHAPE_FLAGS
                   if getattr(args, k, None)})
    try:
        return models_mae.MODELS[args.model](**kwargs)
    except ValueError as e:  # e.g. input size not divisible by the patch size
        raise UserError(str(e)) from None


def patches_per_image(args):
    """The model's patch count (the length of each sample's mask noise, drawn in the loader),
    from its shapes alone: built on the meta device, before the data set gives nb_classes."""
    with torch.device("meta"):
        return build_model(argparse.Namespace(**{**vars(args), "nb_classes": 1})).patch_embed.num_patches


def check_labels(args, dataset):
    """nb_classes from the data; an unlabeled source (no classes) turns the online probe off."""
    args.online_probe = bool(getattr(dataset, "classes", True))
    if not args.online_probe:
        print("unlabeled data: online classifier off (no loss_ce / accuracy), its kNN and online-probe "
              f"monitors skipped{' (--probe_data has its own)' if args.probe_data else ''}")
        args.nb_classes = 1  # the unused head still needs a width
        args.knn_monitor = False
        return
    check_nb_classes(args, dataset)


def log_online_probe(model, dataset_val, device, args, epoch, log_writer):
    val = evaluate_online(model, eval_loader(dataset_val, args), device, args)
    print(f"online probe on {val['n']} unmasked val images: top-1 {val['acc1']:.2f}  top-5 {val['acc5']:.2f}")
    if log_writer is not None:
        log_writer.add_scalar("val/online_acc1", val["acc1"], epoch)
        log_writer.add_scalar("val/online_acc5", val["acc5"], epoch)
    return {"val_online_acc1": val["acc1"], "val_online_acc5": val["acc5"]}


def probe_splits(probe_args, transform):
    """--probe_data's (train, val). Class folders in train/ without val/ hold out the --holdout
    fraction of train/ (util.sources.holdout_split of its sorted names, not stratified by
    class), as a file list or shards without val/ do in build_dataset."""
    root = os.path.join(probe_args.data_path, "train")
    if os.path.exists(os.path.join(probe_args.data_path, "val")) or is_shard_split(root) \
            or os.path.isfile(probe_args.data_path):
        return tuple(build_dataset(probe_args, s, transform) for s in ("train", "val"))
    full = build_dataset(probe_args, "train", transform)
    train, held = held_out(probe_args, root, [os.path.relpath(p, root) for p, _ in full.samples])
    return KeptSubset(full, train), KeptSubset(full, held)


def build_probe(args):
    """--probe_data's (train, val, number of classes) with the eval transform, or None.
    Its labels come from its class folders (or its list's second column), whatever --labels
    says of --data_path."""
    if args.probe_data is None:
        return None
    probe_args = argparse.Namespace(**{**vars(args), "data_path": args.probe_data, "dataset": None,
                                       "labels": "folders", "class_subset": None})
    need = "needs labels: train/<class>/ folders (val/<class>/ optional), their shards or a labelled file list"
    train_root = os.path.join(args.probe_data, "train")
    if os.path.isdir(args.probe_data) and not os.path.isdir(train_root):  # build_dataset's line names --data_path
        raise UserError(f"--probe_data {args.probe_data} {need} ({train_root} does not exist)")
    try:
        train, val = probe_splits(probe_args, eval_transform(args.input_size))
    except UserError as e:  # its hint would name --labels, which is --data_path's
        raise UserError(f"--probe_data {args.probe_data} {need} ({str(e).split(' (')[0]})") from None
    if not getattr(train, "classes", None):
        raise UserError(f"--probe_data {args.probe_data} {need}")
    check_same_classes(train, val, f"--probe_data {args.probe_data}: the val split")
    if args.skip_bad_images:  # a bad probe image would stop every eval epoch
        train, val = (readable_subset(d, args, f"--probe_data {s}") for d, s in ((train, "train"), (val, "val")))
    print(f"probe data {args.probe_data}: kNN and a linear classifier ({LINEAR_EPOCHS} passes) on "
          f"{len(val)} val images, bank and fit on {len(train)} train images, {len(train.classes)} classes, "
          f"every --val_interval epochs")
    return train, val, len(train.classes)


def log_probe(model, probe, device, args, epoch, log_writer):
    """kNN and the linear classifier fit on --probe_data's train split, scored on its val split."""
    train, val, classes = probe
    acc = probe_monitor(model, train, val, classes, device, args)
    knn, lin = acc["knn"], acc["linear"]
    print(f"probe on {knn['n']} --probe_data val images: kNN (k={knn['k']}) top-1 {knn['acc1']:.2f}  "
          f"top-5 {knn['acc5']:.2f}; linear top-1 {lin['acc1']:.2f}  top-5 {lin['acc5']:.2f}")
    stats = {f"probe_{name}_acc{k}": acc[name][f"acc{k}"] for name in ("knn", "linear") for k in (1, 5)}
    if log_writer is not None:
        for name, value in stats.items():
            log_writer.add_scalar(name.replace("probe_", "probe/", 1), value, epoch)
    return stats


def build_train_loader(args, device):
    """MAE's augmentation in the DataLoader workers (by default util/jpeg.py's fast decode
    + crop, normalised on the device; --fast_decode false: all PIL) or, with --gpu_decode,
    split: file reads and crop boxes in the workers, decode + crop + resize + flip +
    normalise on the device (util/gpu_aug.py, same semantics). Batches: (images, targets,
    each sample's mask noise), see util.datasets.EpochSeeded."""
    L = patches_per_image(args)
    if not args.gpu_decode:
        dataset, normalize = build_train_set(args, pretrain_transform(args.input_size))
        check_labels(args, dataset)
        return on_device(train_loader(dataset, args, seed=args.seed, mask_patches=L), normalize, device)
    if args.data_path is None or args.dataset not in (None, "imagefolder"):
        raise UserError("--gpu_decode needs an ImageFolder --data_path (it decodes the image files)")
    dataset = build_dataset(args, "train", PlanCrop(), loader=read_encoded)
    check_labels(args, dataset)
    loader = train_loader(dataset, args, seed=args.seed, collate_fn=collate_encoded, mask_patches=L)
    return DeviceDecodeLoader(loader, args.input_size, device)


def distributed(model, device):
    """DDP with the gradients as views into its all-reduce buckets (gradient_as_bucket_view:
    no copy of the whole gradient into the buckets and back each step)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


class CompiledFeatures:
    """What engine_pretrain.regulariser_grads reads of the model, with the encoder pass
    compiled: --compile with the exact regulariser under accumulation (its extra encoder
    forward per micro-batch would otherwise run eager). The model itself is left as it
    is, so the monitors' encoder passes stay eager."""

    def __init__(self, model):
        self.patch_embed, self.pooled_features = model.patch_embed, model.pooled_features
        self.forward_encoder = torch.compile(model.forward_encoder)


def train(args, model, model_without_ddp, loader, optimizer, scaler, device, run, dataset_val, vis_imgs,
          log_writer, probe=None):
    """Epochs from run.epoch to the end, with monitoring and a checkpoint after every epoch."""
    saver = ckpt.CheckpointSaver(args, model_without_ddp, optimizer, scaler, run, device)
    features = CompiledFeatures(model_without_ddp) if args.compile and exact_accumulation(args) else model_without_ddp
    for epoch in range(run.epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.sampler.start_index = run.start_step(epoch) * args.batch_size
        stats = {f"train_{k}": v for k, v in train_one_epoch(
            model, features, loader, optimizer, scaler, device, epoch, run, saver, args,
            log_writer).items()}
        if args.skip_bad_images:
            stats["train_skipped_images"] = skipped_images(loader)
            print(f"epoch {epoch}: {stats['train_skipped_images']} unreadable training images skipped (--skip_bad_images)")
        last = epoch + 1 == args.epochs
        if args.val_interval and ((epoch + 1) % args.val_interval == 0 or last):
            if args.online_probe:  # needs labels; the diagnostics below do not
                stats.update(log_online_probe(model_without_ddp, dataset_val, device, args, epoch, log_writer))
            stats.update(log_diagnostics(model_without_ddp, dataset_val, device, args, epoch, log_writer))
            if probe is not None:
                stats.update(log_probe(model_without_ddp, probe, device, args, epoch, log_writer))
        if args.vis_every and get_rank() == 0 and ((epoch + 1) % args.vis_every == 0 or last):
            path = save_reconstructions(model_without_ddp, vis_imgs, args.mask_ratio, args.output_dir,
                                        epoch, log_writer)
            print(f"reconstructions written to {path}")
        saver.save(epoch)
        append_log(args.output_dir, {**stats, "epoch": epoch})
        if log_writer is not None:
            log_writer.flush()
        if not last and preempt.stop_requested(device):
            raise preempt.Preempted(f"preempted after epoch {epoch}")


@exit_on_user_error
def main(args):
    notes = check_args(args)
    # First: SIGUSR1/SIGTERM during a slow start (rendezvous, listing, loading) would kill the
    # process by default; with the handlers the run saves at its first poll and exits 0.
    preempt.install_handlers()
    device = init_distributed_mode(args)
    for note in notes:
        print(f"note: {note}")
    print(resolve_num_workers(args))
    seed_everything(args.seed + get_rank())
    if device.type == "cuda":
        set_tf32(args.tf32)
        print(f"tf32 for float32 matmuls: {'on' if args.tf32 else 'off'} (--tf32)")
        torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): tune the patch-embed conv once

    loader = build_train_loader(args, device)
    dataset_val = build_dataset(args, "val", eval_transform(args.input_size)) \
        if args.val_interval or args.vis_every else None
    if dataset_val is not None and args.online_probe:  # the online classifier's accuracy reads val labels
        check_same_classes(train_source(loader), dataset_val)
    if dataset_val is not None and args.skip_bad_images:  # a bad val image would stop every eval epoch
        dataset_val = readable_subset(dataset_val, args)
    probe = build_probe(args) if args.val_interval else None

    model = build_model(args).to(device)
    model_without_ddp = model
    eff_batch = scale_lr(args)
    optimizer = adamw(model_without_ddp, args)
    scaler = grad_scaler(device, args.amp)
    run = ckpt.resume_training(args, model_without_ddp, optimizer, scaler)  # fails before writing anything
    if get_world_size() > 1:
        model = distributed(model, device)
    if args.compile:
        model = torch.compile(model)

    print(f"model {args.model}: {sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad) / 1e6:.2f}M "
          f"trainable params; reg {args.reg} lamb {args.lamb}")
    print(f"effective batch {eff_batch}, lr {args.lr:.3g} (blr {args.blr:.3g}); {loader.sampler.describe()}; "
          f"amp {args.amp}; device {device}; world size {get_world_size()}")
    if args.accum_iter > 1 and args.reg != "none" and args.lamb > 0:
        print("regulariser under accumulation: " + (
            f"exact, on the effective batch of {eff_batch}" if exact_accumulation(args) else
            f"per micro-batch of {args.batch_size * get_world_size()} (--accum_reg micro)"))
    print("args: " + json.dumps(ckpt.plain_args(args)))
    if get_rank() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    log_writer = tensorboard_writer(args.log_dir)
    vis_imgs = torch.stack([dataset_val[i][0] for i in pick_across_classes(dataset_val)]).to(device) \
        if args.vis_every else None

    t0 = time.time()
    run_with_retries(
        args, run,
        lambda: train(args, model, model_without_ddp, loader, optimizer, scaler, device, run, dataset_val,
                      vis_imgs, log_writer, probe),
        lambda: ckpt.resume_training(args, model_without_ddp, optimizer, scaler, run))
    print(f"training time {datetime.timedelta(seconds=int(time.time() - t0))}")
    if log_writer is not None:
        log_writer.close()
    cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
