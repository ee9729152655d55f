"""The CPU kernel measurements behind benchmarks/cpu_speed.py and util.optim's fused AdamW.

    python benchmarks/cpu_kernels.py            # one thread, ViT-Tiny MAE shapes (64 px, 8 px patches, batch 64)

1. float32 matmul of the ViT-Tiny MAE layer shapes: torch (MKL sgemm) vs oneDNN
   (torch.ops.mkldnn._linear_pointwise, what cpu_speed.OneDNNLinear calls), GFLOP/s.
2. attention forward+backward, SDPA (flash kernel on CPU) vs timm's unfused path, in
   float32 and bf16, ms.
3. AdamW step over the model's parameters: per-parameter loop, foreach, fused, ms.
Medians over repeats, the kernels of a line alternating within each repeat.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models_mae  # noqa: E402


def median_ms(fns, repeats):
    """Median ms of each function; they alternate within every repeat, so that load
    changes on a shared machine hit all of them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [1e3 * statistics.median(ts) for ts in times]


def matmuls(batch, t_enc, t_dec, d, dd, repeats):
    rows = []
    for m, k, n in [(batch * t_enc, d, 3 * d), (batch * t_enc, d, 4 * d), (batch * t_enc, 4 * d, d),
                    (batch * t_dec, dd, 4 * dd), (batch * t_dec, 4 * dd, dd), (2048, 2048, 2048)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        mkl, dnn = median_ms([lambda: F.linear(x, w),
                              lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")], repeats)
        gf = 2 * m * k * n / 1e6
        rows.append(f"matmul {m}x{k}x{n}: MKL {gf / mkl:6.1f} GFLOP/s, oneDNN {gf / dnn:6.1f} GFLOP/s "
                    f"({mkl / dnn:.2f}x)")
    return rows


def attention(batch, shapes, repeats):
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for heads, t, hd in shapes:
            q, k, v = [torch.randn(batch, heads, t, hd, dtype=dtype, requires_grad=True) for _ in range(3)]
            sdpa, unf = median_ms([
                lambda: F.scaled_dot_product_attention(q, k, v).sum().backward(),
                lambda: ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1).matmul(v).sum().backward()],
                repeats)
            rows.append(f"attention fwd+bwd {str(dtype)[6:]} B{batch} H{heads} T{t} d{hd}: "
                        f"SDPA {sdpa:7.2f} ms, unfused {unf:7.2f} ms (unfused {sdpa / unf:.2f}x)")
    return rows


def adamw(model, repeats):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kinds = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), **kw) for kw in kinds.values()]
    out = dict(zip(kinds, median_ms([o.step for o in opts], repeats)))
    n = sum(p.numel() for p in model.parameters())
    return [f"AdamW step, {n / 1e6:.2f}M params in {len(list(model.parameters()))} tensors: "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in out.items())]


def main(argv=None):
    p = argparse.ArgumentParser("CPU kernels: MKL vs oneDNN matmul, SDPA vs unfused attention, AdamW")
    p.add_argument("--threads", default=1, type=int)
    p.add_argument("--repeats", default=15, type=int)
    p.add_argument("--batch_size", default=64, type=int)
    cli = p.parse_args(argv)
    torch.set_num_threads(cli.threads)
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch16(img_size=64, patch_size=8)
    t_enc, t_dec = int(64 * 0.25) + 1, 64 + 1
    print(f"torch {torch.__version__}; {torch.backends.cpu.get_cpu_capability()}; {cli.threads} thread(s); "
          f"ViT-Tiny MAE shapes, 64 px images, 8 px patches, batch {cli.batch_size}")
    rows = matmuls(cli.batch_size, t_enc, t_dec, 192, 128, cli.repeats)
    rows += attention(cli.batch_size, [(3, t_enc, 64), (4, t_dec, 32)], cli.repeats)
    rows += adamw(model, cli.repeats)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
