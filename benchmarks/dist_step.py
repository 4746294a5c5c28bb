"""Throughput of cgc.train's own training epoch on 1 or N processes: run it under torchrun
(``torchrun --standalone --nproc_per_node N benchmarks/dist_step.py``) or as a plain script.

Times ``--steps`` steps of :func:`cgc.engine.train_one_epoch` (the default recipe: compact model,
64 px, global batch ``--batch-size``, CGC with global negatives) after ``--warmup`` steps, from
the per-step callback (called after the step's all-reduce, so every process is in step), and
separately the negatives' gather (forward + backward of :meth:`cgc.distributed.Context.gather`
on this process's heatmap rows). The first process prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cgc import CGCTerm, Safeguards, TermConfig, data, distributed, engine, train
from cgc.models import build_model
from cgc.optimization import OptimConfig, Schedule, build_optimizer
from cgc.run_state import RunState
from cgc.structure import to_channels_last


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--norm", default="batch")
    args = p.parse_args(argv)
    ctx = distributed.init("cpu")
    torch.manual_seed(0)
    n = args.batch_size * (args.steps + args.warmup)
    bundle = data.build("synthetic", train_size=n, val_size=8, image_size=args.image_size)
    model = to_channels_last(build_model("compact", len(bundle.classes), norm=args.norm))
    net = train.distribute(model, ctx, sync_bn=False)
    prefix = "module." if net is not model else ""
    config = TermConfig(temperature=0.2, cam_target="predicted", term_gate=0.0, lambda_warmup_epochs=0.0)
    gather = ctx.gather if ctx.distributed else None
    term = CGCTerm.from_config(net, config, target_layer=prefix + "features", channels_last=True, gather=gather)
    opt = build_optimizer(model, OptimConfig(), ["fc"])
    loader = engine.batches(
        bundle.train, distributed.GlobalBatchSampler(n, args.batch_size, rank=ctx.rank, world_size=ctx.world_size), 0
    )
    options = engine.StepOptions(channels_last=True)
    plan = engine.EpochPlan(opt, Schedule(0.05, 1), options, Safeguards(config), ctx, len(loader))
    stamps: list[float] = []
    engine.train_one_epoch(net, term, plan, loader, RunState(), on_step=lambda *_: stamps.append(time.perf_counter()))
    timed = stamps[args.warmup - 1 :]
    step_s = (timed[-1] - timed[0]) / (len(timed) - 1)

    q = torch.rand(args.batch_size // ctx.world_size, args.image_size**2, requires_grad=True)
    gather_s = 0.0
    for rep in range(12):
        ctx.barrier()
        t0 = time.perf_counter()
        rows, _ = ctx.gather(q)
        rows.sum().backward()
        ctx.barrier()
        if rep >= 2:
            gather_s += (time.perf_counter() - t0) / 10
    if ctx.primary:
        print(
            json.dumps(
                {
                    "processes": ctx.world_size,
                    "threads": torch.get_num_threads(),
                    "batch": args.batch_size,
                    "step_ms": 1e3 * step_s,
                    "images_per_s": args.batch_size / step_s,
                    "gather_ms": 1e3 * gather_s,
                }
            )
        )
    term.close()
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main()
