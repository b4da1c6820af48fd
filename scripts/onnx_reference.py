#!/usr/bin/env python3
"""Run an ONNX model with onnxruntime on a raw float32 input, for comparison with tract.

Why: tests/model_reference.rs checks that tract computes the same backbone output as an
independent runtime. This script is that runtime's side and nothing more: it reads a raw
little-endian float32 tensor, runs one output of the model on the CPU execution provider with
graph optimisations disabled (so that the reference is the plain arithmetic of the graph), and
writes the result as raw little-endian float32 plus a JSON line with name and shape.

Usage:
    onnx_reference.py MODEL INPUT_RAW --shape N,C,H,W --out OUTPUT_RAW [--output NAME]

Writes OUTPUT_RAW and OUTPUT_RAW.json ({"name": ..., "shape": [...]}); prints the JSON line.
Exit status 2 means onnxruntime or numpy is not installed (`pip install onnxruntime numpy`).
"""

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("input_raw")
    parser.add_argument("--shape", required=True, help="input shape, e.g. 1,3,64,64")
    parser.add_argument("--out", required=True, help="where to write the raw float32 output")
    parser.add_argument("--output", help="output name (default: the model's first output)")
    args = parser.parse_args()

    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as error:
        print(f"onnx_reference.py: {error}; install with `pip install onnxruntime numpy`",
              file=sys.stderr)
        return 2

    shape = [int(d) for d in args.shape.split(",")]
    data = np.fromfile(args.input_raw, dtype="<f4")
    if data.size != int(np.prod(shape)):
        print(f"onnx_reference.py: {args.input_raw} holds {data.size} floats, "
              f"shape {shape} needs {int(np.prod(shape))}", file=sys.stderr)
        return 1

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = args.output or session.get_outputs()[0].name
    (result,) = session.run([output_name], {input_name: data.reshape(shape)})

    result.astype("<f4").tofile(args.out)
    info = {"name": output_name, "shape": list(result.shape)}
    with open(args.out + ".json", "w", encoding="utf-8") as handle:
        json.dump(info, handle)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
