"""Feature extraction throughput on the CPU: what serving a re-id model costs.

Eval mode, batch 16, 256x128, L2-normalized features, side by side in one run:

* ``resnet50``: the plain ResNet-50 (last stride 1) + BN neck, the group's baseline;
* ``rga_sc_ref``: ResNet-50 + RGA-SC, the reference RGA path (the public op order, N x N relations);
* ``rga_sc_fused``: the same model on the fused path (``fused=True``: the C++ relation op, batch
  norms folded into the weights);
* ``rga_sc_ort``: the same model exported by ``rga.export`` (dynamo ONNX exporter, fixed batch)
  and run by ONNX Runtime's CPU execution provider. Its ratio is against ``rga_sc_fused`` (the
  same model in PyTorch); its peak memory is ONNX Runtime's own and not seen by torch.profiler
  (shown as 0).

Targets (issue 11): ``rga_sc_fused`` at most 1.15x ResNet-50's time (speed-up >= 0.87) and
``rga_sc_ort`` not slower than ``rga_sc_fused`` (>= 1.0). Threads: 2 intra-op threads for PyTorch
and ONNX Runtime alike (RGA_BENCH_THREADS overrides). RGA_BENCH_ROUNDS: timed rounds (default 3;
CI runs 1, which also switches to batch 4 and the TorchScript exporter to stay near a minute). Run:
``pytest bench/bench_extract.py --benchmark-only``. ``python bench/bench_extract.py [ROUNDS]`` times
the four variants in turn within each round instead (interleaved, so that a load change on a
shared machine hits all alike) and prints the time ratios.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from rga import build_model

if torch.cuda.is_available():
    pytest.skip("a CPU serving benchmark", allow_module_level=True)

THREADS = int(os.environ.get("RGA_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("RGA_BENCH_ROUNDS", "3"))
# RGA_BENCH_ROUNDS=1 (the CI pass) is a smoke test of this file in about a minute on 2 cores:
# batch 4 and the TorchScript ONNX exporter (its export takes seconds, the dynamo one ~30 s)
QUICK = ROUNDS == 1
BATCH, HEIGHT, WIDTH = (4 if QUICK else 16), 256, 128
EXPORTER = "torchscript" if QUICK else "dynamo"
GROUP = f"extract b{BATCH} {HEIGHT}x{WIDTH} eval {THREADS}thr"
NUM_CLASSES = 751


@pytest.fixture(autouse=True)
def _cpu_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def _model(impl: str):
    torch.manual_seed(0)
    name = "baseline" if impl == "resnet50" else "rga_sc"
    return build_model(name, NUM_CLASSES, height=HEIGHT, width=WIDTH, fused=impl == "rga_sc_fused",
                       pretrained=False).eval()


def _images():
    return torch.randn(BATCH, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("impl", ["resnet50", "rga_sc_ref", "rga_sc_fused"])
def test_extract_pytorch(bench_record, impl):
    model, x = _model(impl), _images()

    def extract():
        with torch.inference_mode():
            return F.normalize(model(x), dim=1)

    target = 1 / 1.15 if impl == "rga_sc_fused" else None
    bench_record(GROUP, impl, extract, "cpu", rounds=ROUNDS, baseline="resnet50", target=target)


def test_extract_onnxruntime(bench_record, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'rga-kernels[deploy]')")
    pytest.importorskip("onnx")
    from rga.export import export_onnx

    model, x = _model("rga_sc_fused"), _images()
    path = tmp_path / "rga_sc.onnx"
    meta = export_onnx(model, path, dynamic_batch=False, batch_size=BATCH, exporter=EXPORTER)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}

    # the file computes what the PyTorch model computes
    with torch.inference_mode():
        expected = F.normalize(model(x), dim=1)
    assert (torch.from_numpy(session.run(None, feed)[0]) - expected).abs().max() <= 1e-4

    bench_record(GROUP, f"rga_sc_ort ({meta['exporter']})" if meta["exporter"] != "dynamo" else "rga_sc_ort",
                 lambda: session.run(None, feed), "cpu", rounds=ROUNDS, baseline="rga_sc_fused", target=1.0)


def interleaved(rounds: int = 5) -> dict:
    """Median seconds per variant with the variants timed in turn within every round (the order
    rotating), so that a change of load on a shared machine hits all of them alike."""
    import statistics
    import tempfile
    import time

    import onnxruntime as ort

    from rga.export import export_onnx

    torch.set_num_threads(THREADS)
    x = _images()
    fns = {}
    for impl in ("resnet50", "rga_sc_ref", "rga_sc_fused"):
        model = _model(impl)
        fns[impl] = (lambda m: lambda: F.normalize(m(x), dim=1))(model)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(_model("rga_sc_fused"), f"{tmp}/m.onnx", dynamic_batch=False, batch_size=BATCH, exporter=EXPORTER)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        session = ort.InferenceSession(f"{tmp}/m.onnx", options, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    fns["rga_sc_ort"] = lambda: session.run(None, feed)
    names = list(fns)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            fns[n]()  # warm-up
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


if __name__ == "__main__":  # python bench/bench_extract.py [ROUNDS]
    import sys

    med = interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
    for n, s in med.items():
        base = med["rga_sc_fused"] if n == "rga_sc_ort" else med["resnet50"]
        against = "rga_sc_fused" if n == "rga_sc_ort" else "resnet50"
        print(f"{n:<14} {s * 1e3:8.0f} ms  time ratio to {against}: {s / base:.2f}")
