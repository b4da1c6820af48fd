#!/usr/bin/env bash
# The training mode on real data (README, "Training a model"): imports the full Fashion-MNIST
# training set (60 000 images) and test set (10 000) from Debian's dataset-fashion-mnist, trains
# a bundle with `edgesight train` on the CPU (10 % of the training set held out for validation),
# scores it on the test set, and records test accuracy, test loss, per-condition accuracy, k and
# wall time in benches/results/train-NAME.json and in the README table between the
# train-bench:start and train-bench:end marks (rebuilt from every results/train-*.json).
#
# usage: benches/train-fashion-mnist.sh NAME [edgesight train options …]
#   benches/train-fashion-mnist.sh frozen --input-size 64
#   benches/train-fashion-mnist.sh trained --input-size 32 --train-backbone all --backbone-epochs 8
#
# EDGESIGHT_BIN picks the binary (default: the torch build in $CARGO_TARGET_DIR/debug); the
# imported images, the bundles and the logs go to EDGESIGHT_BENCH_DIR (default
# ~/.cache/edgesight/bench/fashion-mnist). Hours on a 2-core CPU; see the README.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
  echo "usage: $0 NAME [edgesight train options …]" >&2
  exit 2
fi
name=$1
shift
target="${CARGO_TARGET_DIR:-target}"
bin="${EDGESIGHT_BIN:-$target/debug/edgesight}"
work="${EDGESIGHT_BENCH_DIR:-$HOME/.cache/edgesight/bench/fashion-mnist}"
source=/usr/share/datasets/fashion-mnist
if [ ! -x "$bin" ]; then
  echo "error: no edgesight binary at $bin (cargo build --features torch, or set EDGESIGHT_BIN)" >&2
  exit 1
fi
if [ ! -f "$source/train-images-idx3-ubyte.gz" ]; then
  echo "error: $source is missing: apt-get install dataset-fashion-mnist" >&2
  exit 1
fi
mkdir -p "$work" benches/results

# import-idx writes to DIR.partial and renames, so an existing folder is complete.
for split in train t10k; do
  out="$work/$split"
  if [ ! -d "$out" ]; then
    "$bin" dataset import-idx --images "$source/$split-images-idx3-ubyte.gz" \
      --labels "$source/$split-labels-idx1-ubyte.gz" --out "$out"
  fi
done

bundle="$work/bundle-$name"
log="$work/$name.log"
start=$(date +%s)
"$bin" train --data "$work/train" --test "$work/t10k" --out "$bundle" --device cpu \
  --val-split 0.1 "$@" 2> >(tee "$log" >&2)
wall=$(( $(date +%s) - start ))

python3 - "$name" "$bundle/report.json" "$wall" "$*" <<'EOF'
import json, os, pathlib, sys

name, report_path, wall, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
report = json.loads(pathlib.Path(report_path).read_text())
cpu = "unknown CPU"
for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
summary = {
    "name": name,
    "arguments": args,
    "cpu": f"{cpu}, {os.cpu_count()} cores",
    "input_size": report["options"]["input_size"],
    "train_backbone": report["options"]["train_backbone"],
    "backbone_epochs": len(report["backbone_training"]["history"]) if report["backbone_training"] else 0,
    "head_epochs": len(report["history"]),
    "train_images": report["images"]["train"],
    "validation_images": report["images"]["validation"],
    "test_images": report["images"]["test"],
    "k": report["k"],
    "variance_kept": report["variance_kept"],
    "test_accuracy": report["test"]["clean"]["accuracy"],
    "test_loss": report["test"]["clean"]["loss"],
    "validation_loss": report["validation"]["clean"]["loss"],
    "conditions": {c["condition"]: c["accuracy"] for c in report["test"]["conditions"]},
    "agreement": report["agreement"],
    "wall_seconds": wall,
    "seconds": report["seconds"],
}
pathlib.Path(f"benches/results/train-{name}.json").write_text(json.dumps(summary, indent=2) + "\n")

rows = []
for path in sorted(pathlib.Path("benches/results").glob("train-*.json")):
    s = json.loads(path.read_text())
    c = s["conditions"]
    trunk = "frozen (seeded)" if s["train_backbone"] == "none" else \
        f"{s['train_backbone']}, {s['backbone_epochs']} epochs"
    per = " / ".join(f"{100 * c.get(k, float('nan')):.1f}" for k in
                     ["clean", "low-light", "motion-blur", "haze", "overexposure"])
    hours = s["wall_seconds"] / 3600
    rows.append(
        f"| {s['name']} | {s['input_size']} | {trunk} | {s['head_epochs']} | {s['k']} "
        f"({100 * s['variance_kept']:.1f} %) | **{100 * s['test_accuracy']:.2f} %** | "
        f"{s['test_loss']:.3f} | {per} | {hours:.2f} h |")
table = "\n".join([
    "Fashion-MNIST, trained on 54 000 images (6 000 held out for validation), scored on the "
    "10 000 test images; CPU only, " + json.loads(
        sorted(pathlib.Path("benches/results").glob("train-*.json"))[-1].read_text())["cpu"] + ".",
    "",
    "| run | input | trunk | head epochs | k (variance) | test accuracy | test loss | "
    "accuracy per condition: clean / low light / motion blur / haze / over-exposure (%) | "
    "wall time |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    *rows,
])
readme = pathlib.Path("README.md")
text = readme.read_text()
start, end = "<!-- train-bench:start -->", "<!-- train-bench:end -->"
if start in text and end in text:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")
else:
    print("README.md has no train-bench marks; table not copied there", file=sys.stderr)
print(table)
EOF
