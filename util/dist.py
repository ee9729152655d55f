"""torch.distributed helpers. Launch with torchrun (which sets RANK, WORLD_SIZE,
LOCAL_RANK) or with srun/submitit under SLURM (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID plus MASTER_ADDR/MASTER_PORT); a plain `python` run is one process."""
import builtins
import datetime
import os

import torch
import torch.distributed as dist


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


def init_distributed_mode(args):
    """Fill args.rank/world_size/gpu/distributed from the launcher's environment and
    initialise the process group (NCCL on CUDA, gloo on CPU)."""
    env = os.environ
    if getattr(args, "dist_on_itp", False) and "OMPI_COMM_WORLD_RANK" in env:  # MPI launchers (MAE's ITP)
        env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    if "RANK" in env and "WORLD_SIZE" in env:
        args.rank, args.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        args.gpu = int(env.get("LOCAL_RANK", max(getattr(args, "local_rank", 0), 0)))  # or --local-rank
    elif "SLURM_PROCID" in env and "MASTER_ADDR" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        args.rank, args.world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        args.gpu = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_PORT", "29500")
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        _silence_non_main(True)
        return
    args.distributed = True
    use_cuda = torch.cuda.is_available() and str(args.device).startswith("cuda")
    if use_cuda:
        args.gpu %= torch.cuda.device_count()  # srun may bind one GPU per task
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, init_method=getattr(args, "dist_url", "env://"),
                            world_size=args.world_size,
                            rank=args.rank)
    _silence_non_main(args.rank == 0)
    print(f"| distributed init rank {args.rank}/{args.world_size} backend {backend}", force=True)
    dist.barrier()


def cleanup():
    if is_dist():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """In-place sum over ranks (no-op on one process); returns the tensor."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward gives each rank the gradient of the summed loss.

    Every rank computes the same global loss on the gathered batch, so its local
    gradient w.r.t. the gathered tensor is the full dL/dZ. Summing it over ranks
    (rather than returning the local slice, as the published GatherLayer does)
    cancels DDP's division by the world size: the parameter gradient then equals
    that of one process holding the whole batch.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.local_size = x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.local_size
        return grad[start:start + ctx.local_size]


def gather_with_grad(x):
    """Concatenate x (same shape on every rank) over ranks, differentiably."""
    if not is_dist() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
