"""Command-line flags shared by main_pretrain.py, main_linprobe.py and main_finetune.py."""
import argparse
import os
import random

import numpy as np
import torch

from util.errors import UserError


def str2bool(v):
    """A real boolean flag: `--flag`, `--flag True`, `--flag false`, `--flag 0`."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def add_bool(parser, name, default, help):
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default, help=help)


def add_common_args(parser, batch_size=64, epochs=400, input_size=224):
    g = parser.add_argument_group("training")
    g.add_argument("--batch_size", default=batch_size, type=int,
                   help="batch size per GPU (effective batch = batch_size * accum_iter * GPUs)")
    g.add_argument("--epochs", default=epochs, type=int)
    g.add_argument("--accum_iter", default=1, type=int,
                   help="accumulate gradients over this many steps before an update")
    g.add_argument("--input_size", default=input_size, type=int, help="image size")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype; auto = bf16 on CUDA, none on CPU")
    add_bool(g, "--tf32", False, "TF32 for the float32 matmuls and convolutions on CUDA (faster, 10-bit "
             "mantissa; the regulariser and the GPU resize stay full float32); default off, as PyTorch and MAE")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * eff. batch / 256)")
    g.add_argument("--blr", type=float, default=1e-3, help="base lr: lr = blr * effective batch / 256")
    g.add_argument("--min_lr", type=float, default=0.0, help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=40, help="epochs of linear lr warmup")

    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default=None, type=str,
                   help="ImageFolder root with train/ and val/, or its make_shards.py shard root (or CIFAR "
                   "files); none = synthetic data")
    g.add_argument("--dataset", default=None, choices=["imagefolder", "cifar10", "cifar100", "synthetic"],
                   help="default: imagefolder when --data_path is given, else synthetic")
    g.add_argument("--labels", default="folders", choices=["folders", "none"],
                   help="folders: train/<class>/ folders give labels (ImageFolder); none: every image below "
                   "--data_path, unlabeled. A --data_path that is a text file is a file list either way")
    g.add_argument("--holdout", default=0.01, type=float,
                   help="fraction held out for val when the source has no val/ (at least 1, at most 5000 images)")
    g.add_argument("--class_subset", default=None, help="file of class folder names (wnids) to keep")
    g.add_argument("--synthetic_size", default=4096, type=int, help="train images of the synthetic set")
    g.add_argument("--nb_classes", default=None, type=int,
                   help="number of classes (default: from the dataset; checked against it)")
    g.add_argument("--num_workers", default=None, type=int,
                   help="loader processes per training process (default: the usable cores per local "
                   "process, less one, at most 16; printed at start)")
    add_bool(g, "--fast_decode", True, "training images from files: libjpeg-turbo decode with the crop "
             "box drawn first, one vectorised resize, uint8 batches normalised on the device "
             "(util/jpeg.py); false = the plain PIL path")
    add_bool(g, "--exif_transpose", False, "turn images upright by their EXIF orientation tag (phone photos), "
             "on every decode path; off by default: it changes some ImageNet images (about 1 in 1000)")
    g.add_argument("--max_image_pixels", default=89_478_485, type=int,
                   help="PIL's decompression-bomb limit (its default): a warning line over it, an error naming "
                   "the file over twice it; 0 = no limit")
    add_bool(g, "--skip_bad_images", False, "an unreadable training image is skipped (replaced by the next "
             "index's sample, one line naming it) and counted in log.txt (train_skipped_images); unreadable "
             "evaluation images (val, --probe_data, main_analyze's kNN bank) are left out of every evaluation "
             "(one line at start); "
             "default: the run stops with one line naming the file")
    add_bool(g, "--pin_mem", True, "pin CPU memory in the DataLoader")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")

    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, pictures")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="checkpoint to resume from")
    add_bool(g, "--auto_resume", True, "continue from the newest checkpoint in output_dir")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N")
    g.add_argument("--save_every", default=20, type=int, help="keep a checkpoint every N epochs")
    g.add_argument("--print_freq", default=20, type=int, help="console/TensorBoard every N steps")

    g = parser.add_argument_group("survival")
    g.add_argument("--save_every_steps", default=0, type=int,
                   help="also checkpoint every N steps within an epoch (0 = only at epoch ends)")
    g.add_argument("--keep_last", default=2, type=int,
                   help="keep the newest N checkpoints (plus every --save_every-th epoch's and the final)")
    g.add_argument("--nan_retries", default=0, type=int,
                   help="on a non-finite loss, reload the last checkpoint and skip the batch, at most N times")

    g = parser.add_argument_group("distributed (set by torchrun)")
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int)
    g.add_argument("--dist_on_itp", action="store_true")
    g.add_argument("--dist_url", default="env://")
    g.add_argument("--world_size", default=None, type=int,
                   help="MAE's flag, accepted and ignored: the number of processes comes from torchrun / SLURM")
    g.add_argument("--dist_timeout", default=30, type=float,
                   help="minutes a rank waits for the others (a rank-0 checkpoint write, a lost host)")
    return parser


def check_common_args(args):
    """Fail early, before anything is written, on values that cannot work. Returns
    notes for the start of the log (flags of MAE's that mean nothing here)."""
    notes = []
    if args.world_size is not None:
        notes.append(f"--world_size {args.world_size} ignored: the number of processes comes from "
                     "torchrun / SLURM (as in MAE, where the launcher's WORLD_SIZE overrides it)")
    for name in ("batch_size", "epochs", "accum_iter", "input_size", "save_every", "print_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.save_every_steps < 0 or args.save_every_steps % args.accum_iter:
        raise UserError(f"--save_every_steps must be a multiple of --accum_iter ({args.accum_iter}), "
                        f"got {args.save_every_steps}")
    if getattr(args, "holdout", None) is not None and not 0 < args.holdout < 1:  # -0.5 held out 1 image
        raise UserError(f"--holdout {args.holdout}: a fraction between 0 and 1 is needed")
    if args.keep_last < 1 or args.nan_retries < 0:
        raise UserError("--keep_last must be >= 1 and --nan_retries >= 0")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError("--num_workers must be >= 0")
    if args.max_image_pixels < 0:
        raise UserError(f"--max_image_pixels must be >= 0 (0: no limit), got {args.max_image_pixels}")
    check_output_dir(args.output_dir)
    if args.data_path is not None and not os.path.exists(args.data_path):
        raise UserError(f"data_path {args.data_path} does not exist (a folder, or a text file listing images)")
    if args.resume and not os.path.isfile(args.resume):
        raise UserError(f"resume checkpoint {args.resume} does not exist")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no GPU is available (use --device cpu)")
    args.pin_mem = args.pin_mem and args.device.startswith("cuda")
    if args.amp == "auto":
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.log_dir is None:
        args.log_dir = args.output_dir
    return notes


def check_output_dir(path):
    """output_dir (or the nearest of its parents that exists) must be a folder, else
    creating it later fails with a traceback after the model was built."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == os.path.abspath(path) else f" ({existing} is a file)"
        raise UserError(f"--output_dir {path} is not a folder{where}; choose another --output_dir")


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def resolve_num_workers(args, env=os.environ):
    """Fill in the --num_workers default: the usable cores (this process's CPU affinity)
    per process on this node (torchrun's LOCAL_WORLD_SIZE; an srun task's affinity is
    already its own share), less one for the process itself, at most 16. Returns the
    line to print at start."""
    if args.num_workers is not None:
        return f"loader workers: {args.num_workers} per process (--num_workers)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    # At most 16: about 13 cores keep one ViT-B GPU fed (RESULTS.md, cores per GPU), and each
    # further worker only adds memory (its prefetched batches, its copy of the file list) and
    # start-up time, e.g. 95 workers for a 96-core node's one process.
    args.num_workers = max(1, min(16, cores // local - 1))
    return (f"loader workers: {args.num_workers} per process ({cores} usable cores / {local} processes on this "
            "node, less 1 for the process, at most 16; --num_workers sets it)")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`) and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")
