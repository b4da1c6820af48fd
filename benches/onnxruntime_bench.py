#!/usr/bin/env python3
"""Times a backbone.onnx in onnxruntime (PyPI) for the tract-vs-onnxruntime comparison.

Prints one JSON object: {"engine", "version", "batch", "threads", "ms_per_image"}. The input is
seeded noise of the model's shape; only the time matters here.
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    data = np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.size, args.size), dtype=np.float32
    )
    for _ in range(3):
        session.run(None, {name: data})
    times = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        session.run(None, {name: data})
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    print(json.dumps({
        "engine": "onnxruntime",
        "version": ort.__version__,
        "batch": args.batch,
        "threads": args.threads,
        "ms_per_image": median * 1000.0 / args.batch,
    }))


if __name__ == "__main__":
    main()
