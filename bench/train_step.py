"""Time one ResNet-50 (+ RGA-SC) training step on a GPU and write the figures as JSON.

    python bench/train_step.py OUT.json [--batch 64] [--budget-s 110]

Variants, batch 64, 256x128, bf16 autocast, Adam: plain ResNet-50 (last stride 1), RGA-SC on the
reference path, RGA-SC fused in eager mode, and RGA-SC fused under `--cuda-graphs`'s code path
(rga.train.compile_for_training, torch.compile mode="reduce-overhead"). Each: warm-up steps (the
compile included for the last), then the median of CUDA-event timings of whole steps, and the
peak memory of the caching allocator over the timed steps. Variants that would start after
--budget-s seconds are recorded as skipped, so the script ends within its time limit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _step_fn(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, _, logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()

    return step


def measure(name: str, batch: int, warmup: int, reps: int) -> dict:
    from rga import build_model
    from rga.train import compile_for_training

    torch.manual_seed(0)
    arch = "baseline" if name == "resnet50" else "rga_sc"
    model = build_model(arch, 751, pretrained=False, fused=name.startswith("fused")).cuda().train()
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    if name == "fused_cuda_graphs":
        model = compile_for_training(model, cuda_graphs=True)
    x = torch.randn(batch, 3, 256, 128, device="cuda")
    y = torch.randint(0, 751, (batch,), device="cuda")
    step = _step_fn(model, opt, x, y)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"step_ms": round(statistics.median(times), 3), "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "warmup_s": round(warm_s, 1), "reps": reps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=110.0)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    result = {"batch": args.batch, "input": "256x128", "dtype": "bf16 autocast", "variants": {}}
    if not torch.cuda.is_available():
        result["skipped"] = "needs a CUDA GPU"
        json.dump(result, open(args.out, "w"), indent=1)
        print("train_step: skipped (needs a CUDA GPU)")
        return 0
    result["gpu"] = torch.cuda.get_device_name()
    t_start = time.perf_counter()
    # expected cost of each variant in seconds (the CUDA-graphs one compiles first): skip what cannot fit
    plan = [("resnet50", 5, 10), ("reference", 10, 10), ("fused", 15, 10), ("fused_cuda_graphs", 80, 10)]
    for name, cost, warmup in plan:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < cost:
            result["variants"][name] = {"skipped": f"{left:.0f} s left of the budget, about {cost} s needed"}
            continue
        try:
            result["variants"][name] = measure(name, args.batch, warmup, args.reps)
        except Exception as exc:  # record and go on: one broken variant must not hide the others
            result["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        torch.cuda.empty_cache()
        print(name, result["variants"][name], flush=True)
        json.dump(result, open(args.out, "w"), indent=1)  # partial results survive a kill
    base = result["variants"].get("resnet50", {})
    for name, v in result["variants"].items():
        if "step_ms" in v and "step_ms" in base and name != "resnet50":
            v["time_vs_resnet50"] = round(v["step_ms"] / base["step_ms"], 3)
            v["memory_vs_resnet50"] = round(v["peak_GiB"] / base["peak_GiB"], 3)
    json.dump(result, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
