"""Checkpoints of plain data (tensors, numbers, strings, dicts, lists) that load
with torch.load(weights_only=True). Written by rank 0 only, atomically: a
temporary file in the same folder, flushed and fsynced, then renamed, so a
crash mid-write never leaves a truncated file under a checkpoint's name."""
import argparse
import contextlib
import os
import pickle
import random
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

from util import interop, preempt
from util.dist import (all_gather_object, any_rank, barrier, broadcast_object, get_rank, get_world_size, is_dist,
                       is_main_process)
from util.datasets import class_difference
from util.errors import UserError

CKPT_RE = re.compile(r"^checkpoint-(\d+)(?:-step(\d+))?\.pth$")


def _plain(v):
    if isinstance(v, (bool, int, float, str, type(None))):
        return v
    if isinstance(v, (list, tuple, set)):  # e.g. skip_steps, a set of (epoch, step)
        return [_plain(x) for x in (sorted(v) if isinstance(v, set) else v)]
    return str(v)


def plain_args(args):
    """argparse Namespace -> dict of plain values (no pickled objects)."""
    return {k: _plain(v) for k, v in vars(args).items()}


def atomic_save(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_on_main(obj, path):
    """Rank 0 writes; every rank waits until the file is in place."""
    if is_main_process():
        atomic_save(obj, path)
    barrier()


def load_checkpoint(path):
    """Load with weights_only=True; every failure becomes one clear line. The one
    object allowed besides plain data is argparse.Namespace, which the official MAE /
    U-MAE / M-MAE training scripts store as 'args' (returned here as a dict)."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder (a Hugging Face model?): main_export.py --import_from "
                        "it writes a checkpoint of this codebase")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives (torch >= 1.6)
        if _is_safetensors(path):
            raise UserError(f"checkpoint {path} is a safetensors file (timm's?), not a checkpoint of this codebase: "
                            "main_export.py --import_from it writes one")
        raise UserError(f"checkpoint {path} is truncated or corrupt (not a torch zip archive)")
    try:
        with _allowing(argparse.Namespace):
            state = _load_mapped(path)
    except pickle.UnpicklingError as e:
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip().splitlines()[0])  # torch colours its message
        raise UserError(f"checkpoint {path} holds pickled objects and is refused "
                        f"(loading uses weights_only=True): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is truncated or corrupt: {first}") from None
    if isinstance(state, dict) and isinstance(state.get("args"), argparse.Namespace):
        state["args"] = vars(state["args"])
    return state


def _is_safetensors(path):
    """A safetensors header: an 8-byte little-endian length, then JSON starting with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _load_mapped(path):
    """torch.load memory-mapping the file: tensors are read from it as they are used
    (copy-on-write), so a resume does not first read the whole file into every rank's
    RAM. A file system that cannot map files gets a plain load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError):  # no mmap here, or a corrupt file (the plain load says which)
        return torch.load(path, map_location="cpu", weights_only=True)


def _allowing(*types):
    """weights_only loading that also accepts these classes (torch >= 2.5 scopes it to the
    call; torch 2.4 has only the process-wide allowlist)."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(list(types))
    torch.serialization.add_safe_globals(list(types))
    return contextlib.nullcontext()


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():  # this process's GPU (cuda:N), which draws its masks
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def _numpy_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _python_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def checkpoint_name(epoch, step=None):
    return f"checkpoint-{epoch}.pth" if step is None else f"checkpoint-{epoch}-step{step}.pth"


def list_checkpoints(output_dir):
    """Checkpoints in output_dir, newest position first: [(path, epoch, step)]."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CKPT_RE.match(name)
        if m:
            epoch, step = int(m.group(1)), int(m.group(2)) if m.group(2) else None
            # an end-of-epoch checkpoint comes after every mid-epoch one of that epoch
            found.append((os.path.join(output_dir, name), epoch, step))
    return sorted(found, key=lambda x: (x[1], float("inf") if x[2] is None else x[2]), reverse=True)


def find_resume_checkpoint(args, newest=False):
    """The checkpoint to continue from: --resume, else with --auto_resume (or newest)
    the newest readable one in output_dir (a corrupt newest file is reported and skipped).
    A run started with --resume X continues from its own newest checkpoint in output_dir
    once it has one: a requeued job runs the same command and must not go back to X.
    Rank 0 looks and every rank loads its choice: ranks listing a network file system
    can see different newest files."""
    if args.resume and not newest:
        if getattr(args, "eval", False):  # evaluate exactly the file named
            return args.resume, load_checkpoint(args.resume)
        path, state = newest_of_this_run(args) if is_main_process() else (None, None)
        path = broadcast_object(path)
        if path is None:
            state = load_checkpoint(args.resume)
            past = broadcast_object(checkpoint_past(args, state) if is_main_process() else None)
            if past:
                raise UserError(f"--resume {args.resume}: --output_dir {args.output_dir} already holds {past}, "
                                "further on, of another run: this run's checkpoints would mix with its and "
                                "--keep_last would delete them; choose another --output_dir (nothing was changed)")
            return args.resume, state
        print(f"--resume {args.resume} started this run; continuing from its newest checkpoint {path}")
        return path, state if state is not None else load_checkpoint(path)
    if not (args.auto_resume or newest):
        if broadcast_object(bool(list_checkpoints(args.output_dir))):
            raise UserError(f"{args.output_dir} already holds checkpoints; pass --auto_resume or "
                            "--resume, or choose another --output_dir (nothing was overwritten)")
        return None, None
    path, state = newest_readable(args.output_dir) if is_main_process() else (None, None)
    path = broadcast_object(path)
    if path is not None and state is None:
        state = load_checkpoint(path)
    return path, state


def checkpoint_past(args, state):
    """The name of a checkpoint in output_dir further on than where --resume's `state` starts
    this run (another run's: a run only writes past its start), or None. Positions as
    (next epoch, next step), a file's from its name, in this run's steps."""
    if "optimizer" in state:
        unit = state.get("global_batch") or args.batch_size * get_world_size()
        start = (state.get("next_epoch", state.get("epoch", -1) + 1),
                 state.get("next_step", 0) * unit / (args.batch_size * get_world_size()))
    else:  # weights only: a new schedule from --start_epoch
        start = (args.start_epoch, 0)
    for path, epoch, step in list_checkpoints(args.output_dir):
        at = (epoch + 1, 0) if step is None else (epoch, step)
        if at > start and not os.path.samefile(path, args.resume):
            return os.path.basename(path)
    return None


def newest_readable(output_dir):
    """(path, state) of the newest checkpoint in output_dir that loads, or (None, None)."""
    for path, _, _ in list_checkpoints(output_dir):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            print(f"warning: skipping unreadable checkpoint: {e}")
    return None, None


def newest_of_this_run(args):
    """(path, state) of output_dir's newest readable checkpoint when a run started with
    this --resume wrote it (its saved args name the same file), else (None, None)."""
    path, state = newest_readable(args.output_dir)
    started = (state or {}).get("args", {}).get("resume") or ""
    if path is None or not started or os.path.realpath(started) != os.path.realpath(args.resume):
        return None, None
    return path, state


def load_model_state(model, state_dict, source, model_name=None, ckpt_model=None):
    """Strict load; a checkpoint of another model gives one clear line."""
    if model_name and ckpt_model and model_name != ckpt_model:
        raise UserError(f"checkpoint {source} is for model {ckpt_model}, not {model_name}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"checkpoint {source} does not fit model {model_name}: {detail}") from None


def check_decoder_heads(model, saved_args, path):
    """A head count does not show in the weights' shapes, so a strict load of a decoder with
    other heads succeeds and computes something else: a checkpoint that records its decoder's
    (an HF import, a run with --decoder_num_heads) must match the model built here."""
    want = (saved_args or {}).get("decoder_num_heads") if isinstance(saved_args, dict) else None
    blocks = getattr(model, "decoder_blocks", None)
    if want and blocks and blocks[0].attn.num_heads != want:
        raise UserError(f"checkpoint {path} has {want} decoder heads, this model {blocks[0].attn.num_heads}: "
                        f"pass --decoder_num_heads {want}")


def warn_changed_objective(saved_args, args, path):
    """A resumed run takes its objective from the command line, as MAE's: a checkpoint
    trained (or imported) with another mask ratio, target or regulariser is said, in one
    line each, instead of silently training something else (the loss jumps)."""
    saved = saved_args if isinstance(saved_args, dict) else {}
    for key in ("mask_ratio", "norm_pix_loss", "reg", "lamb"):
        if key in saved and hasattr(args, key) and saved[key] != getattr(args, key):
            print(f"warning: checkpoint {path} was trained with --{key} {saved[key]}, this run uses "
                  f"{getattr(args, key)}: pass --{key} to keep the checkpoint's")


def check_same_start(saved_args, args, path):
    """A run continued from `path` must be the run this command starts: a fine-tuning whose
    --finetune names another encoder would silently go on with the old one (the default
    output folder and --auto_resume make that the easy mistake). Another --epochs is
    allowed (a longer schedule, as MAE) but said."""
    saved = saved_args if isinstance(saved_args, dict) else {}
    old, new = saved.get("finetune") or "", getattr(args, "finetune", "") or ""
    if old and new and not os.path.isabs(old):  # an older run's name as typed, relative to a folder not known
        print(f"note: {path} continues a run started from --finetune {old} (a relative name, not compared "
              f"with {new}, which is not loaded)")
        old = ""
    # rank 0 looks (a shared file system may show a file late on another host)
    there, same = broadcast_object((os.path.exists(old), os.path.exists(old) and os.path.samefile(old, new))
                                   if old and new and is_main_process() else (False, True))
    if old and new and not same:
        if there:
            raise UserError(f"{path} continues a run started from --finetune {old}, not {new}: to start from "
                            f"{new}, give a new --output_dir; to continue, give --finetune {old}")
        print(f"note: {path} continues a run started from --finetune {old} (no longer there); {new} is not loaded")
    if "epochs" in saved and saved["epochs"] != args.epochs:
        print(f"note: {path} was saved in a run of --epochs {saved['epochs']}; the schedule from here is "
              f"that of --epochs {args.epochs}")


def gather_rng_states():
    """Every rank's RNG states (each rank draws its own masks), as a list by rank."""
    return all_gather_object(rng_state())


@dataclass
class RunState:
    """Where a run continues and what it carries across restarts (kept off args)."""
    epoch: int = 0                                  # the epoch to run next
    step: int = 0                                   # its first step (> 0: resumed mid-epoch)
    skip_steps: set = field(default_factory=set)    # (epoch, step) pairs stepped over (--nan_retries)
    logger_totals: dict = None                      # the resumed epoch's metric sums so far

    def start_step(self, epoch):
        return self.step if epoch == self.epoch else 0

    def totals_for(self, epoch):
        """The resumed epoch's metric sums, saved summed over ranks: rank 0 carries them and
        the others the same names at zero, so that the epoch's all-reduce counts them once."""
        if epoch != self.epoch or not self.step or not self.logger_totals:
            return None
        return {k: list(v) if is_main_process() else [0.0, 0] for k, v in self.logger_totals.items()}


def save_training(args, epoch, model, optimizer, scaler, step=None, run=None, logger_totals=None, classes=None):
    """Everything needed to continue: model, optimizer, grad scaler, position (in
    steps of global_batch samples, with the effective batch, so that a run on another
    world size continues at the same sample), args (plain dict), the run's skipped
    steps, the epoch's metric sums so far, every rank's RNG states and, given them, the
    class names by label index (a plain list of str, for exports). step=None marks
    the end of `epoch`; otherwise the run continues at `step` of `epoch`. Old
    checkpoints beyond --keep_last are removed, except every --save_every-th epoch's.
    Returns the path written."""
    done = epoch if step is None else epoch - 1  # last completed epoch (MAE's 'epoch')
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "epoch": done,
             "next_epoch": done + 1 if step is None else epoch, "next_step": step or 0,
             **position_units(args), "args": plain_args(args), "rng": gather_rng_states(),
             "skip_steps": sorted(list(s) for s in (run.skip_steps if run else ())),
             "logger_totals": logger_totals}
    if classes is not None:
        state["classes"] = list(classes)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, checkpoint_name(epoch, step))
    save_on_main(state, path)
    if is_main_process():
        prune_checkpoints(args.output_dir, getattr(args, "keep_last", 2), args.save_every, args.epochs)
    return path


def prune_checkpoints(output_dir, keep_last, save_every, epochs):
    """Keep the newest keep_last checkpoints, every save_every-th end-of-epoch one
    and the final one; remove the rest (and stray temporary files)."""
    for i, (path, epoch, step) in enumerate(list_checkpoints(output_dir)):
        wanted = step is None and ((epoch + 1) % save_every == 0 or epoch + 1 == epochs)
        if i >= keep_last and not wanted:
            os.remove(path)
    for name in os.listdir(output_dir):
        if ".pth.tmp." in name:
            pid = name.rsplit(".", 1)[-1]
            if not (pid.isdigit() and os.path.exists(f"/proc/{pid}")):
                os.remove(os.path.join(output_dir, name))


def resume_training(args, model, optimizer, scaler, run=None, classes=None):
    """Continue from --resume or (with --auto_resume) the newest checkpoint in
    output_dir; returns the RunState to continue from (epoch --start_epoch, step 0
    when there is nothing to resume). Given a `run` (a retry after a non-finite
    loss), load the newest checkpoint in output_dir into it, keeping its skipped
    steps. A weights-only checkpoint (no optimizer, e.g. an official MAE file)
    loads the model and starts a new schedule. Given this run's `classes`, a
    checkpoint that names other ones is refused."""
    fresh = RunState(epoch=args.start_epoch)
    path, state = find_resume_checkpoint(args, newest=run is not None)
    if state is not None:
        if "model" not in state:
            raise UserError(f"checkpoint {path} has no 'model' entry")
        check_classes(state.get("classes"), classes, path)
        weights = state["model"] if "optimizer" in state else interop.pretraining_weights(model, state["model"], path)
        load_model_state(model, weights, path, args.model, state.get("args", {}).get("model"))
        check_decoder_heads(model, state.get("args"), path)
        warn_changed_objective(state.get("args"), args, path)
        if "optimizer" not in state:
            print(f"loaded weights from {path}; starting at epoch {fresh.epoch}")
        else:
            if not getattr(args, "eval", False):  # --eval trains nothing: neither encoder nor schedule matters
                check_same_start(state.get("args"), args, path)
            optimizer.load_state_dict(state["optimizer"])
            load_scaler_state(scaler, state.get("scaler"), path)
            rngs = state.get("rng") or []
            if get_rank() < len(rngs):
                set_rng_state(rngs[get_rank()])
            step, skip_steps = position_here(state, args, path)
            fresh = RunState(epoch=state.get("next_epoch", state["epoch"] + 1), step=step, skip_steps=skip_steps,
                             logger_totals=state.get("logger_totals"))
            print(f"resumed from {path}; starting at epoch {fresh.epoch} step {fresh.step}")
    if run is None:
        return fresh
    run.epoch, run.step, run.logger_totals = fresh.epoch, fresh.step, fresh.logger_totals
    run.skip_steps |= fresh.skip_steps
    return run


def check_classes(saved, here, path):
    """The same head output must mean the same class: a checkpoint trained on other class
    names (or another order) would go on training and evaluating with every label moved.
    Either side without names (an older checkpoint, a file list's bare labels) is not checked."""
    diff = class_difference(saved, here, "the checkpoint", "this dataset")
    if diff:
        raise UserError(f"checkpoint {path} was trained on other classes: {diff}; give --data_path "
                        "the classes it was trained on (or, to train afresh, a new --output_dir)")


def position_units(args):
    """global_batch (samples per step over all ranks: the unit of next_step and skip_steps)
    and the effective batch; none for a checkpoint saved outside a training run."""
    if not hasattr(args, "batch_size"):
        return {}
    per_step = args.batch_size * get_world_size()
    return {"global_batch": per_step, "effective_batch": per_step * getattr(args, "accum_iter", 1)}


def position_here(state, args, path):
    """The checkpoint's next step and skipped (epoch, step)s in this run's steps of
    batch_size x world samples (the saved run may have had another world size; the
    sampler's global batches make step k samples [k*B*W, (k+1)*B*W) at any size).
    Refuses another effective batch: it would change every update and the lr (an
    --eval run, which does not train, takes any)."""
    if getattr(args, "eval", False):
        return 0, set()
    per_step, world = args.batch_size * get_world_size(), get_world_size()
    here = per_step * args.accum_iter
    saved = state.get("effective_batch", here)  # older checkpoints do not say
    if saved != here:
        fix = (f"--accum_iter {saved // per_step}" if saved % per_step == 0 else
               f"--batch_size and --accum_iter with batch_size x accum_iter x {world} = {saved}" if saved % world == 0
               else f"a number of processes that divides {saved}")
        raise UserError(f"checkpoint {path} was trained with effective batch {saved} (batch_size x accum_iter x "
                        f"processes), this run's is {here} ({args.batch_size} x {args.accum_iter} x {world}): "
                        f"resume with the same, e.g. {fix}")
    unit = state.get("global_batch", per_step)
    sample = state.get("next_step", 0) * unit
    if sample % per_step:  # checkpoints are taken at group starts: a multiple of the effective batch
        raise UserError(f"checkpoint {path} stopped at sample {sample} of its epoch, not a multiple of this run's "
                        f"{per_step} samples per step")
    skips = {(e, k) for e, s in state.get("skip_steps", [])  # the steps now holding a skipped step's samples
             for k in range(s * unit // per_step, -(-(s + 1) * unit // per_step))}
    return sample // per_step, skips


def load_scaler_state(scaler, saved, path):
    """An fp16 run resumed from a bf16 or fp32 checkpoint (whose scaler was disabled and
    saved nothing) starts a fresh loss scale; otherwise the saved scale continues."""
    if scaler.is_enabled() and not saved:
        print(f"note: {path} has no fp16 loss-scaler state (saved without --amp fp16); "
              f"starting a fresh scaler at scale {scaler.get_scale():g}")
        return
    if saved:
        scaler.load_state_dict(saved)


class CheckpointSaver:
    """Writes the run's checkpoints: after every epoch, and at step boundaries (the
    first step of an accumulation group, where no gradient is pending) every
    --save_every_steps steps or when preemption was asked for, then raises Preempted."""

    def __init__(self, args, model, optimizer, scaler, run, device, classes=None):
        self.args, self.model, self.optimizer, self.scaler = args, model, optimizer, scaler
        self.run, self.device, self.classes = run, device, classes
        self.stop = False

    def save(self, epoch, step=None, logger_totals=None):
        return save_training(self.args, epoch, self.model, self.optimizer, self.scaler, step, self.run,
                             logger_totals, self.classes)

    def poll_preemption(self):
        """Distributed runs: every rank learns of a signal to any rank at the same step
        (one tiny all-reduce, so call it every print_freq steps only)."""
        if is_dist():
            self.stop = self.stop or any_rank(preempt.requested_locally(), self.device)

    def at_step_boundary(self, epoch, step, logger, guard):
        if not is_dist():
            self.stop = self.stop or preempt.requested_locally()
        if self.stop or (self.args.save_every_steps and step % self.args.save_every_steps == 0):
            guard.check()  # never save a state that went non-finite
            self.save(epoch, step, logger.totals_after_flush())
        if self.stop:
            raise preempt.Preempted(f"preempted at epoch {epoch} step {step}")
