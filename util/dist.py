"""torch.distributed helpers. Launch with torchrun (which sets RANK, WORLD_SIZE,
LOCAL_RANK) or with srun/submitit under SLURM (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID; MASTER_ADDR defaults to the allocation's first host and MASTER_PORT
to 15000 + (job id + 1000 x step id) % 10000); a plain `python` run is one process."""
import builtins
import datetime
import os
import re
import shutil
import socket
import subprocess

import torch
import torch.distributed as dist

from util.errors import UserError


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def get_rank():
    return dist.get_rank() if is_dist() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def _silence_non_main(is_master):
    """print() only on the main process, unless called with force=True."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            now = datetime.datetime.now().strftime("%H:%M:%S")
            builtin_print(f"[{now}]", *args, **kwargs)

    builtins.print = print


def first_host(nodelist):
    """The first host of a SLURM hostlist ("node[03-05,9],gpu1" -> "node03"):
    `scontrol show hostnames` where installed, else the common forms parsed here."""
    if shutil.which("scontrol"):
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()[0]
    first = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist).group(0)  # up to the first top-level comma
    return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", first)  # each [a-b,c] -> a


def _slurm_rendezvous(env):
    """MASTER_ADDR/MASTER_PORT for the tasks of one srun step, the same on every task."""
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise UserError(f"srun started {env['SLURM_NTASKS']} tasks but neither MASTER_ADDR nor "
                            "SLURM_JOB_NODELIST is set: export MASTER_ADDR=<first host of the job>")
        env["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in env:
        step = env.get("SLURM_STEP_ID", "0")  # two steps of one job at once: a port each, as the launchers
        step = int(step) if step.isdigit() else 0
        env["MASTER_PORT"] = str(15000 + (int(env.get("SLURM_JOB_ID", 0)) + 1000 * step) % 10000)
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if nodes > 1 and is_loopback(env["MASTER_ADDR"]):  # the other nodes would wait on their own loopback
        raise UserError(f"srun runs on {nodes} nodes but MASTER_ADDR={env['MASTER_ADDR']} is this host's "
                        "loopback (exported by the submitting shell?): unset it, or set it to the first "
                        "node's name")


def is_loopback(addr):
    """localhost, 127.x, ::1 or 0.0.0.0 (by name or address, without a DNS lookup)."""
    return addr in ("localhost", "::1", "0.0.0.0", "") or addr.startswith("127.") or addr.endswith(".localhost")


def init_distributed_mode(args):
    """Initialise the process group from the launcher's environment (NCCL on CUDA,
    gloo on CPU) and return this process's torch.device (cuda:LOCAL_RANK under a
    launcher). args is read, never written: rank and world size come from
    get_rank() / get_world_size()."""
    env = os.environ
    if getattr(args, "dist_on_itp", False) and "OMPI_COMM_WORLD_RANK" in env:  # MPI launchers (MAE's ITP)
        env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", max(getattr(args, "local_rank", 0), 0)))  # or --local-rank
    elif "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:  # a task of `srun -n N` (N > 1)
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        _slurm_rendezvous(env)
    else:
        _silence_non_main(True)
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # so "cuda" (RNG state, new tensors) means this GPU
        return device
    use_cuda = torch.cuda.is_available() and str(args.device).startswith("cuda")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", local % torch.cuda.device_count())  # srun may bind one GPU per task
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    # the timeout bounds a wait for a rank that is gone or slow (a big checkpoint write, a cold
    # compile); device_id binds NCCL to this rank's GPU up front
    minutes = getattr(args, "dist_timeout", 30)
    if minutes <= 0:
        raise UserError(f"--dist_timeout must be a positive number of minutes, got {minutes:g}")
    try:
        dist.init_process_group(backend=backend, init_method=getattr(args, "dist_url", "env://"),
                                world_size=world_size, rank=rank, device_id=device if use_cuda else None,
                                timeout=datetime.timedelta(minutes=minutes))
    except dist.DistStoreError as e:  # a rank that never came: name where they were to meet
        raise UserError(f"rank {rank}/{world_size}: not all ranks met at {env.get('MASTER_ADDR')}:"
                        f"{env.get('MASTER_PORT')} within --dist_timeout {minutes:g} min ({e})") from None
    _silence_non_main(rank == 0)
    print(f"| distributed init rank {rank}/{world_size} backend {backend} on {socket.gethostname()}", force=True)
    dist.barrier()
    return device


def cleanup():
    if is_dist():
        dist.destroy_process_group()


def _on_backend_device(tensor):
    """NCCL reduces CUDA tensors only: CPU tensors travel through the current GPU."""
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        return tensor.cuda()
    return tensor


def _all_reduce(tensor, op):
    if is_dist():
        t = _on_backend_device(tensor)
        dist.all_reduce(t, op=op)
        if t is not tensor:
            tensor.copy_(t)
    return tensor


def all_reduce_sum(tensor):
    """In-place sum over ranks (no-op on one process); returns the tensor."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_min(tensor):
    """In-place minimum over ranks; returns the tensor."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def all_reduce_max(tensor):
    """In-place maximum over ranks; returns the tensor."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def any_rank(flag, device="cpu"):
    """True on every rank if `flag` is true on any rank (one tiny all-reduce)."""
    if not is_dist():
        return bool(flag)
    return bool(all_reduce_max(torch.tensor([1.0 if flag else 0.0], device=device)).item())


def all_gather_padded(x, size):
    """(world, size, ...): every rank's x (at most `size` rows, same trailing shape),
    each padded with zeros to `size` rows."""
    x = torch.cat([x, x.new_zeros((size - x.shape[0],) + x.shape[1:])])
    if not is_dist():
        return x.unsqueeze(0)
    t = _on_backend_device(x.contiguous())
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t)
    return torch.stack(out).to(x.device)


def all_gather_object(obj):
    """Every rank's picklable `obj`, as a list by rank."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_with_grad(x):
    """Concatenate x (same shape on every rank) over ranks, differentiably.

    The backward (torch's own differentiable all_gather) sums every rank's gradient
    for the local slice: every rank computes the same global loss on the gathered
    batch, so this cancels DDP's division by the world size and the parameter
    gradient equals one process holding the whole batch. (The published GatherLayer
    returns only the local gradient, which divides the regulariser by the world size.)
    """
    if not is_dist() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


class _GatherWithGrad(torch.autograd.Function):
    """torch.distributed.nn.functional.all_gather's rule on public collectives (that function
    is deprecated for a private module): forward gathers, backward sums every rank's
    gradient of the whole batch and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(out, x)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may hand the same tensor to others
        dist.all_reduce(grad)
        return grad.chunk(get_world_size())[get_rank()]


def broadcast_buffers(module, src=0):
    """In place: rank `src`'s buffers (e.g. BatchNorm running statistics) on every rank."""
    if is_dist():
        for b in module.buffers():
            t = _on_backend_device(b.data)
            dist.broadcast(t, src=src)
            if t is not b.data:
                b.data.copy_(t)


def broadcast_object(obj, src=0):
    """Rank `src`'s picklable `obj` on every rank (one process: `obj` itself)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
