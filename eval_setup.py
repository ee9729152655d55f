"""Setup and epoch loop shared by main_linprobe.py and main_finetune.py.

Both scripts: parse the common flags plus `add_eval_args`, check them
(`check_eval_args`), call `prepare`, build
their transform, `build_data`, `build_model` (loads --finetune), their head and
optimizer, then `run`, which resumes, trains with engine_finetune, evaluates
top-1/top-5 on the whole val split after every epoch, keeps checkpoint-best.pth
and the periodic/last checkpoints, and logs to log.txt and TensorBoard.
With --eval, `run` only evaluates --resume (default: output_dir's checkpoint-best.pth,
else its newest checkpoint; the log says which).
"""
import datetime
import json
import os
import time
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

import models_vit
from engine_finetune import evaluate, train_one_epoch
from util import checkpoint as ckpt
from util import preempt
from util.amp import grad_scaler, set_tf32
from util.cli import add_bool, check_common_args, resolve_num_workers, seed_everything
from util.datasets import (IMAGENET_MEAN, IMAGENET_STD, MAERandomResizedCrop, build_dataset, build_train_set,
                           check_nb_classes, check_same_classes, class_names, eval_loader, eval_transform, num_classes_of, on_device,
                           readable_subset, train_loader)
from util.dist import broadcast_buffers, broadcast_object, cleanup, get_rank, get_world_size, init_distributed_mode
from util.errors import UserError
from util.metric_logger import append_log, tensorboard_writer
from util.survival import run_with_retries

BEST = "checkpoint-best.pth"


def add_eval_args(parser, model, global_pool):
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=model, help=", ".join(models_vit.MODELS))
    g.add_argument("--patch_size", default=None, type=int, help="override the model's patch size")
    g.add_argument("--depth", default=None, type=int, help="override the model's number of blocks")
    g.add_argument("--finetune", default="", help="pretrained checkpoint (ours or an official MAE file)")
    add_bool(g, "--global_pool", global_pool, "classify the mean patch token (+ fc_norm) instead of cls")
    g.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="classify the cls token (same as --global_pool false)")
    add_bool(g, "--compile", False, "torch.compile the model")
    g.add_argument("--eval", action="store_true",
                   help="only evaluate --resume (default: checkpoint-best.pth in output_dir, else the newest "
                        "checkpoint there)")
    g.add_argument("--dist_eval", action="store_true",
                   help="MAE's flag, accepted and ignored: evaluation here is always split over the processes, "
                        "exactly (no padding)")
    return parser


def eval_checkpoint(args):
    """What --eval evaluates without --resume: output_dir's checkpoint with the best val
    top-1 (what the training run reported as its result), else the newest."""
    best = os.path.join(args.output_dir, BEST)
    if os.path.isfile(best):
        return best, "the best val top-1 kept in --output_dir"
    found = ckpt.list_checkpoints(args.output_dir)
    if not found:
        raise UserError("--eval needs a checkpoint: pass --resume, or an --output_dir holding one")
    return found[0][0], f"the newest in --output_dir; no {BEST} there"


def check_eval_args(args):
    """The flag checks of both scripts that need no process group (submit_slurm.py runs
    them before queueing too); returns notes for the start of the log."""
    notes = check_common_args(args)
    if args.dist_eval:
        notes.append("--dist_eval ignored: evaluation is always split over the processes, exactly")
    if args.model not in models_vit.MODELS:
        raise UserError(f"unknown --model {args.model}; choose from {', '.join(models_vit.MODELS)}")
    if args.finetune and os.path.isdir(args.finetune):
        raise UserError(f"pretrained checkpoint {args.finetune} (--finetune) is a folder (a Hugging Face model?): "
                        "main_export.py --import_from it writes a checkpoint of this codebase")
    if args.finetune and not os.path.isfile(args.finetune):
        raise UserError(f"pretrained checkpoint {args.finetune} (--finetune) does not exist")
    if args.finetune:  # saved in the args as an absolute path: a relaunch from elsewhere compares it right
        args.finetune = os.path.abspath(args.finetune)
    if args.eval and not args.resume:
        args.resume, why = eval_checkpoint(args)
        notes.append(f"--eval without --resume: evaluating {args.resume} ({why})")
    return notes


def prepare(args, notes):
    """Start distributed, print the checks' `notes` once the main process is known, seed."""
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
        torch.backends.cudnn.benchmark = True  # the training batches have one shape (drop_last)
    return device


def linprobe_transform(input_size):
    """MAE's linear-probe augmentation: its own RandomResizedCrop (default scale) + flip."""
    return transforms.Compose([
        MAERandomResizedCrop(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_data(args, train_tf):
    """Train (unless --eval) and val sets and loaders; fills/checks args.nb_classes."""
    # train_tf's crop is done while decoding unless --fast_decode false (util.datasets.build_train_set)
    dataset_train, normalize = (None, None) if args.eval else build_train_set(args, train_tf)
    dataset_val = build_dataset(args, "val", eval_transform(args.input_size))
    check_nb_classes(args, dataset_train if dataset_train is not None else dataset_val)
    if num_classes_of(dataset_val) != args.nb_classes:
        raise UserError(f"the val split has {num_classes_of(dataset_val)} classes, "
                        f"the train split {args.nb_classes}")
    if dataset_train is not None:
        check_same_classes(dataset_train, dataset_val)
    if args.skip_bad_images:  # a bad val image would stop every evaluation
        dataset_val = readable_subset(dataset_val, args)
    return SimpleNamespace(
        train=dataset_train, val=dataset_val,
        train_loader=None if args.eval else on_device(train_loader(dataset_train, args, seed=args.seed),
                                                      normalize, args.device),
        val_loader=eval_loader(dataset_val, args))


def build_model(args, drop_path_rate=0.0):
    """The classifier, with the pretrained encoder of --finetune loaded (not for --eval:
    the evaluated checkpoint holds every weight)."""
    kwargs = dict(img_size=args.input_size, num_classes=args.nb_classes,
                  global_pool=args.global_pool, drop_path_rate=drop_path_rate)
    kwargs.update({k: getattr(args, k) for k in ("patch_size", "depth") if getattr(args, k)})
    model = models_vit.MODELS[args.model](**kwargs)
    if args.finetune and not args.eval:
        missing, dropped = models_vit.load_pretrained(model, args.finetune, args.model)
        print(f"loaded pretrained encoder from {args.finetune}; new: {missing}; "
              f"dropped {len(dropped)} pretraining-only tensors")
    elif not args.eval:
        print("warning: no --finetune checkpoint; the encoder starts from random weights")
    return model


def _previous_best(args):
    """Best val top-1 already kept in output_dir (a resumed or restarted run must not
    replace a better checkpoint-best.pth); refuses to touch it without --auto_resume.
    Rank 0 reads it and every rank takes its answer: whether a save (and its barrier)
    runs must not depend on how each rank sees a shared file system."""
    best, problem = broadcast_object(_read_previous_best(args) if get_rank() == 0 else None)
    if problem:
        raise UserError(problem)
    return best


def _read_previous_best(args):
    """(best top-1 or -1, None) or (None, the one-line problem)."""
    path = os.path.join(args.output_dir, BEST)
    if not os.path.isfile(path):
        return -1.0, None
    if not (args.auto_resume or args.resume):
        return None, f"{path} exists; pass --auto_resume or choose another --output_dir (nothing was overwritten)"
    try:
        return float(ckpt.load_checkpoint(path).get("acc1", -1.0)), None
    except UserError as e:
        return None, str(e)


def _report(prefix, stats):
    print(f"{prefix}: top-1 {stats['acc1']:.2f}  top-5 {stats['acc5']:.2f}  loss {stats['loss']:.4f}  "
          f"on {stats['n']} val images")


def run(args, device, model, optimizer, data, criterion, mixup_fn=None, clip_grad=None):
    model_without_ddp = model
    scaler = grad_scaler(device, args.amp)
    # saved in every checkpoint, for the exports (main_export: HF id2label, timm label_names)
    classes = class_names(data.train if data.train is not None else data.val)
    run_state = ckpt.resume_training(args, model_without_ddp, optimizer, scaler, classes=classes)
    if get_rank() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.eval:
        stats = evaluate(model_without_ddp, data.val_loader, device, args)
        _report(f"evaluation of {args.resume}", stats)
        append_log(args.output_dir, {"eval_checkpoint": args.resume,
                                     **{f"test_{k}": v for k, v in stats.items()}})
        cleanup()
        return stats

    max_acc = _previous_best(args)
    if get_world_size() > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)  # no gradient copy per step
    if args.compile:
        model = torch.compile(model)
    n_train = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    eff_batch = args.batch_size * args.accum_iter * get_world_size()
    print(f"model {args.model} ({'global pool' if args.global_pool else 'cls token'}): "
          f"{n_train / 1e6:.3f}M trainable params; {args.nb_classes} classes")
    print(f"effective batch {eff_batch}, lr {args.lr:.3g} (blr {args.blr:.3g}); "
          f"{data.train_loader.sampler.describe()}; amp {args.amp}; device {device}; world size {get_world_size()}")
    print("args: " + json.dumps(ckpt.plain_args(args)))
    log_writer = tensorboard_writer(args.log_dir)
    saver = ckpt.CheckpointSaver(args, model_without_ddp, optimizer, scaler, run_state, device, classes)

    def train():
        nonlocal max_acc
        for epoch in range(run_state.epoch, args.epochs):
            data.train_loader.sampler.set_epoch(epoch)
            data.train_loader.sampler.start_index = run_state.start_step(epoch) * args.batch_size
            train_stats = train_one_epoch(model, criterion, data.train_loader, optimizer, scaler, device, epoch,
                                          run_state, saver, args, mixup_fn, clip_grad, log_writer)
            # every rank evaluates what rank 0 saves: each updates its own BatchNorm statistics
            # (the probe's), and DDP broadcasts them only at a synced forward
            broadcast_buffers(model_without_ddp)
            test = evaluate(model_without_ddp, data.val_loader, device, args)
            _report(f"epoch {epoch}", test)
            if test["acc1"] > max_acc:
                max_acc = test["acc1"]
                ckpt.save_on_main({"model": model_without_ddp.state_dict(), "epoch": epoch,
                                   "acc1": test["acc1"], "acc5": test["acc5"],
                                   "args": ckpt.plain_args(args), **({"classes": classes} if classes else {})},
                                  os.path.join(args.output_dir, BEST))
            print(f"max top-1: {max_acc:.2f}")
            # Every epoch, so auto-resume loses little; save_training prunes all but the
            # newest, every --save_every-th and the final checkpoint.
            saver.save(epoch)
            if log_writer is not None:
                for k in ("acc1", "acc5", "loss"):
                    log_writer.add_scalar(f"val/{k}", test[k], epoch)
                log_writer.flush()
            append_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                         **{f"test_{k}": v for k, v in test.items()},
                                         "max_acc1": max_acc, "epoch": epoch, "n_parameters": n_train})
            if epoch + 1 < args.epochs and preempt.stop_requested(device):
                raise preempt.Preempted(f"preempted after epoch {epoch}")

    t0 = time.time()
    run_with_retries(args, run_state, train,
                     lambda: ckpt.resume_training(args, model_without_ddp, optimizer, scaler, run_state, classes))
    print(f"training time {datetime.timedelta(seconds=int(time.time() - t0))}")
    if log_writer is not None:
        log_writer.close()
    cleanup()
