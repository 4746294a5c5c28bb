"""Per-kernel profile of forward + backward of each op at one benchmark size, on CUDA:
``python benchmarks/profile_ops.py [backend ...]`` prints, per op and backend, the wall time per
call (synchronized) and the profiler's table of device kernels, to tell kernel time from host
overhead."""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cgc import ops, transforms


def cases(device):
    A = torch.randn(64, 512, 7, 7, device=device, requires_grad=True)
    G = torch.randn(64, 512, 7, 7, device=device, requires_grad=True)
    go = torch.randn(64, 7, 7, device=device)
    x = torch.randn(64, 1, 7, 7, device=device, requires_grad=True)
    theta = transforms.random_crop_flip(64, 224, 224).theta().to(device)
    a = torch.rand(64, 224 * 224, device=device, requires_grad=True)
    p = torch.rand(64, 224 * 224, device=device, requires_grad=True)
    return {
        "gradcam 64x512x7x7": lambda be: ops.gradcam(A, G, pool=False, backend=be).backward(go),
        "affine_warp 64x1x7x7->224": lambda be: (
            ops.affine_warp(x, theta, 224, padding_mode="border", backend=be).sum().backward()
        ),
        "info_nce 64x50176": lambda be: ops.info_nce(a, p, 0.5, backend=be).backward(),
    }


def main(backends):
    device = "cuda"
    for name, fn in cases(device).items():
        for be in backends:
            for _ in range(5):
                fn(be)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                fn(be)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / 50
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn(be)
                torch.cuda.synchronize()
            print(f"\n=== {name} [{be}]: {wall * 1e3:.3f} ms per fwd+bwd (wall, synchronized)")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main(sys.argv[1:] or ["reference", "native"])
