#!/usr/bin/env python3
"""Times a backbone.onnx in onnxruntime or OpenVINO (both from PyPI), or measures the machine's
f32 matrix-product peak, for `benches/compare.rs`.

    engines.py MODEL --engine onnxruntime|openvino [--precision f32|bf16] --batch B --threads T
    engines.py --gemm --threads T

Prints one JSON object. A model run reports {"engine", "version", "batch", "threads",
"precision" (what the engine says it ran), "ms_per_image"}: the median of repeated runs after a
warm-up, with at least `--iterations` runs and at least `--seconds` of timing. The input is
seeded noise of the model's shape; only the time matters. The GEMM peak is numpy's (OpenBLAS)
f32 2048×2048 product, best of several, in GFLOP/s; run it with OPENBLAS_NUM_THREADS set, as
compare.rs does, so that it uses T threads.
"""
import argparse
import json
import time

import numpy as np


def timed(run, batch, iterations, seconds):
    for _ in range(2):
        run()
    times = []
    started = time.perf_counter()
    while len(times) < iterations or time.perf_counter() - started < seconds:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1000.0 / batch


def gemm_peak():
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--engine", choices=["onnxruntime", "openvino"], default="onnxruntime")
    parser.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--gemm", action="store_true")
    args = parser.parse_args()

    if args.gemm:
        print(json.dumps({"engine": "numpy", "version": np.__version__,
                          "threads": args.threads, "gflops": gemm_peak()}))
        return

    data = np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.size, args.size), dtype=np.float32
    )
    if args.engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        version, ran = ort.__version__, "f32"

        def run():
            session.run(None, {name: data})
    else:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(args.model)
        model.reshape({model.inputs[0].get_any_name(): list(data.shape)})
        config = {
            "INFERENCE_NUM_THREADS": args.threads,
            "INFERENCE_PRECISION_HINT": "bf16" if args.precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        version = ov.__version__.split("-")[0]
        # On a CPU without bf16 instructions OpenVINO runs f32 whatever the hint says.
        hint = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        ran = "bf16" if "bf16" in hint else "f16" if "f16" in hint else "f32"

        def run():
            request.infer({0: data})

    print(json.dumps({
        "engine": args.engine,
        "version": version,
        "batch": args.batch,
        "threads": args.threads,
        "precision": ran,
        "ms_per_image": timed(run, args.batch, args.iterations, args.seconds),
    }))


if __name__ == "__main__":
    main()
