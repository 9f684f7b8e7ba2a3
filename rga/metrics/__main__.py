"""python -m rga.metrics --num-query 11659 --num-gallery 82161 --dim 2048: time a random-feature
evaluation and report its peak RSS."""
from __future__ import annotations

import numpy as np
import torch

from . import evaluate_features
from .distance import METRICS


def _bench(argv=None) -> None:
    """Time a random-feature evaluation and report peak RSS:
    python -m rga.metrics --num-query 11659 --num-gallery 82161 --dim 2048"""
    import argparse
    import resource
    import time

    p = argparse.ArgumentParser(description=_bench.__doc__)
    p.add_argument("--num-query", type=int, default=11659)
    p.add_argument("--num-gallery", type=int, default=82161)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--num-ids", type=int, default=3060)
    p.add_argument("--num-cams", type=int, default=15)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--metric", default="cosine", choices=METRICS)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)

    def status_mib(key):  # VmRSS (now) or VmHWM (peak since the last reset), Linux only
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    rng = np.random.default_rng(0)
    # features built in slices so that generating them never doubles their memory
    gf = np.empty((a.num_gallery, a.dim), np.float32)
    for s in range(0, a.num_gallery, 4096):
        gf[s:s + 4096] = rng.standard_normal((min(4096, a.num_gallery - s), a.dim), np.float32)
    qf = rng.standard_normal((a.num_query, a.dim), np.float32)
    g_pids = rng.integers(0, a.num_ids, a.num_gallery)
    q_pids = rng.integers(0, a.num_ids, a.num_query)
    g_cams = rng.integers(0, a.num_cams, a.num_gallery)
    q_cams = rng.integers(0, a.num_cams, a.num_query)
    reset_peak()
    base = status_mib("VmRSS")
    feat_mib = (gf.nbytes + qf.nbytes) / 2 ** 20
    t0 = time.perf_counter()
    r = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=a.metric,
                          chunk_size=a.chunk_size, device=a.device)
    dt = time.perf_counter() - t0
    print(f"Q={a.num_query} G={a.num_gallery} D={a.dim} chunk={a.chunk_size} "
          f"device={a.device or 'cpu'} threads={torch.get_num_threads()}")
    print(f"features {feat_mib:.0f} MiB; RSS before eval {base:.0f} MiB, peak during eval "
          f"{status_mib('VmHWM'):.0f} MiB, process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; eval time {dt:.1f} s")
    print(f"mAP={r['mAP']:.4f} R1={r['cmc'][0]:.4f} valid={r['num_valid_queries']}")


if __name__ == "__main__":
    _bench()
