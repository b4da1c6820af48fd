#!/usr/bin/env bash
# Assembles a LIBTORCH directory for tch 0.26 (torch 2.13.0) from the PyPI wheels, caches it
# outside the checkout, and prints the environment lines that point cargo at it:
#
#   env=$(scripts/libtorch.sh) && eval "$env" && cargo build --features torch
#   env=$(scripts/libtorch.sh --cuda) && eval "$env"    # on a CUDA host: the CUDA libraries
#
# CPU-only (the default, ~490 MB): torch/lib and torch/include from the torch wheel, without
# the CUDA libraries. Two details make that work on a machine without a GPU:
# - libtorch_cpu.so itself needs libcudart.so.13 and libcupti.so.13: they come from the small
#   nvidia-cuda-runtime and nvidia-cuda-cupti wheels (together ~5 MB);
# - libtorch.so, which torch-sys links, lists libtorch_cuda.so as needed, and that library
#   pulls in the multi-GB CUDA wheels (cuBLAS, cuDNN, NCCL, …). The CPU directory drops that
#   entry with patchelf (Debian package) instead of downloading them: nothing on the CPU path
#   calls into it, and libtorch reports no CUDA device.
# --cuda downloads torch with all its nvidia-* dependency wheels (several GB) and copies every
# library into one lib/ directory, unpatched.
#
# The binary finds the libraries through an rpath that build.rs sets from $LIBTORCH; the script
# also prints LD_LIBRARY_PATH for other tools. Wheels are cached in ~/.cache/edgesight/wheels,
# pip runs from a virtual environment there (python3-venv), and everything comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

version=2.13.0
flavour=cpu
case "${1:-}" in
  "") ;;
  --cuda) flavour=cuda ;;
  *) echo "usage: $0 [--cuda]" >&2; exit 2 ;;
esac

cache="${EDGESIGHT_CACHE:-$HOME/.cache/edgesight}"
wheels="$cache/wheels"
dir="$cache/libtorch-$version-$flavour"
if [ ! -f "$dir/build-version" ]; then
  {
    scripts/install-packages.sh python3 python3-venv patchelf
    tools="$cache/pip-tools"
    if ! "$tools/bin/pip" --version >/dev/null 2>&1; then
      rm -rf "$tools"
      python3 -m venv "$tools"
    fi
    mkdir -p "$wheels"
    if [ "$flavour" = cpu ]; then
      "$tools/bin/pip" download --quiet --no-deps --only-binary=:all: --dest "$wheels" \
        --cache-dir "$cache/pip" "torch==$version" 'nvidia-cuda-runtime==13.0.96.*' \
        'nvidia-cuda-cupti==13.0.85.*'
    else
      "$tools/bin/pip" download --quiet --only-binary=:all: --dest "$wheels" \
        --cache-dir "$cache/pip" "torch==$version"
    fi
    # A directory of this run's own, so two runs at once do not remove each other's work.
    partial=$(mktemp -d "$dir.partial.XXXXXX")
    trap 'rm -rf "$partial"' EXIT
    "$tools/bin/python" - "$wheels" "$partial" "$version" "$flavour" <<'EOF'
import glob, os, shutil, sys, zipfile
wheels, out, version, flavour = sys.argv[1:]
cuda_only = {"libc10_cuda.so", "libcaffe2_nvrtc.so", "libtorch_cuda.so",
             "libtorch_cuda_linalg.so", "libtorch_nvshmem.so"}
skip = {"libtorch_python.so"} | (cuda_only if flavour == "cpu" else set())

def copy(wheel, name, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with wheel.open(name) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)

# The wheel for this Python (pip fetched that one; others may be cached from other runs).
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
torch_wheels = glob.glob(f"{wheels}/torch-{version}-{tag}-*.whl")
if len(torch_wheels) != 1:
    sys.exit(f"expected one torch {version} wheel in {wheels}, found {torch_wheels}")
with zipfile.ZipFile(torch_wheels[0]) as wheel:
    for name in wheel.namelist():
        if name.endswith("/"):
            continue
        keep = name.startswith(("torch/include/", "torch/share/cmake/")) or (
            name.startswith("torch/lib/") and os.path.basename(name) not in skip)
        if keep:
            copy(wheel, name, os.path.join(out, name[len("torch/"):]))
if flavour == "cpu":
    wanted = {"nvidia_cuda_runtime-13.0.96-*.whl": "libcudart.so.13",
              "nvidia_cuda_cupti-13.0.85-*.whl": "libcupti.so.13"}
    for pattern, lib in wanted.items():
        with zipfile.ZipFile(glob.glob(f"{wheels}/{pattern}")[0]) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith("/" + lib))
            copy(wheel, name, os.path.join(out, "lib", lib))
else:
    # Every shared library of every nvidia-* wheel torch depends on, flattened into lib/.
    for path in glob.glob(f"{wheels}/nvidia_*.whl"):
        with zipfile.ZipFile(path) as wheel:
            for name in wheel.namelist():
                if "/lib/" in name and ".so" in os.path.basename(name):
                    copy(wheel, name, os.path.join(out, "lib", os.path.basename(name)))
EOF
    if [ "$flavour" = cpu ]; then
      patchelf --remove-needed libtorch_cuda.so "$partial/lib/libtorch.so"
    fi
    # torch-sys reads the version from this file, as in the official libtorch archives.
    echo "$version" > "$partial/build-version"
    chmod 755 "$partial"
    rm -rf "$dir"
    mv "$partial" "$dir"
    trap - EXIT
  } >&2
fi
echo "export LIBTORCH='$dir'"
echo "export LD_LIBRARY_PATH='$dir/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
