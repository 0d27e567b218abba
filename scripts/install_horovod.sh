#!/usr/bin/env bash
# Build and install Horovod (PyTorch frontend) into a Python environment.
#
# Usage:  scripts/install_horovod.sh [VENV_DIR | PYTHON]   [--build-only] [--force]
#
#   VENV_DIR / PYTHON   the environment to install into (a virtual environment directory or
#                       a python executable; default: `python3` on PATH)
#   --build-only        build (or find) the cached wheel, do not install it
#   --force             rebuild the wheel even if a cached one exists, reinstall
#
# Why a script: Horovod 0.28.1 (the latest release) does not compile against torch >= 2.1
# as released, because its CMake files ask for C++14 while torch's headers need C++17
# (torch 2.1-2.9) or C++20 (newer torch, e.g. 2.14) (C++17 fixed upstream after the release,
# horovod PR #3998, never released). This script
#   1. does nothing if `import horovod.torch` already works in the target (idempotent);
#   2. otherwise installs a cached wheel if there is one for this exact (horovod, torch,
#      python, variant) combination — a fresh venv then takes seconds;
#   3. otherwise downloads the sdist from PyPI (`pip download --no-binary :all:`), sets
#      CMAKE_CXX_STANDARD 14 -> 17 or 20 (what the target's torch headers require) in
#      CMakeLists.txt and horovod/torch/CMakeLists.txt,
#      builds a wheel with `pip wheel --no-build-isolation` against the target's torch
#      (~2-3 min on 2 cores), stores it in the cache and installs it.
#
# Variants (chosen automatically, recorded in the cache key):
#   cpu       HOROVOD_WITH_GLOO=1, no MPI, no GPU operations (always works; horovodrun --gloo)
#   +mpi      HOROVOD_WITH_MPI=1 when `mpicc` is on PATH (srun/mpirun launch without horovodrun)
#   nccl      HOROVOD_GPU_OPERATIONS=NCCL when `nvcc` is on PATH and torch sees a CUDA GPU;
#             NCCL is taken from $HOROVOD_NCCL_HOME, else from the nvidia-nccl wheel that
#             torch depends on, else from the CUDA toolkit / system paths.
# Override with HOROVOD_VARIANT=cpu|cpu+mpi|nccl|nccl+mpi.
#
# Environment: HOROVOD_VERSION (default 0.28.1), DEEPHEMNMA_WHEEL_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/deephemnma/wheels), MAKEFLAGS/HOROVOD_BUILD_JOBS (build
# parallelism, default: number of cores).
set -euo pipefail

HVD_VERSION="${HOROVOD_VERSION:-0.28.1}"
TARGET="python3"
BUILD_ONLY=0
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --build-only) BUILD_ONLY=1 ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        -*) echo "install_horovod.sh: unknown option $arg" >&2; exit 2 ;;
        *) TARGET="$arg" ;;
    esac
done

if [ -d "$TARGET" ]; then
    PY="$TARGET/bin/python"
else
    PY="$(command -v "$TARGET" || true)"
fi
if [ -z "$PY" ] || [ ! -x "$PY" ]; then
    echo "install_horovod.sh: no python found at '$TARGET'" >&2
    exit 2
fi
say() { echo "[install_horovod] $*"; }

if [ "$FORCE" = 0 ] && [ "$BUILD_ONLY" = 0 ] && "$PY" -c "import horovod.torch" >/dev/null 2>&1; then
    say "horovod.torch already importable in $PY ($("$PY" -c 'import horovod; print(horovod.__version__)')): nothing to do"
    exit 0
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "install_horovod.sh: torch is not importable in $PY; install the project's dependencies first" >&2
    exit 2
fi
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"

# ---------------------------------------------------------------- variant
if [ -n "${HOROVOD_VARIANT:-}" ]; then
    VARIANT="$HOROVOD_VARIANT"
else
    GPU=cpu
    if command -v nvcc >/dev/null 2>&1 && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        GPU=nccl
    fi
    VARIANT="$GPU"
    if command -v mpicc >/dev/null 2>&1; then
        VARIANT="$GPU+mpi"
    fi
fi
case "$VARIANT" in cpu|cpu+mpi|nccl|nccl+mpi) ;; *) echo "install_horovod.sh: bad HOROVOD_VARIANT=$VARIANT" >&2; exit 2 ;; esac

CACHE_ROOT="${DEEPHEMNMA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deephemnma/wheels}"
KEY="horovod-${HVD_VERSION}_torch-${TORCH_VERSION}_${PY_TAG}_${VARIANT}"
CACHE_DIR="$CACHE_ROOT/$KEY"
say "target python: $PY (torch $TORCH_VERSION, $PY_TAG); variant: $VARIANT"

find_wheel() { ls "$CACHE_DIR"/horovod-*.whl 2>/dev/null | head -n 1 || true; }

WHEEL="$(find_wheel)"
if [ "$FORCE" = 1 ] || [ -z "$WHEEL" ]; then
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    say "downloading the horovod $HVD_VERSION sdist from PyPI"
    "$PY" -m pip download --no-binary :all: --no-deps -d "$WORK/sdist" "horovod==$HVD_VERSION" >/dev/null
    tar -xzf "$WORK"/sdist/horovod-*.tar.gz -C "$WORK"
    SRC="$(ls -d "$WORK"/horovod-*/ | head -n 1)"

    # C++ standard: both CMake files pin C++14; torch 2.1-2.9 headers need C++17 and newer
    # torch (ATen.h: "C++20 or later compatible compiler is required") needs C++20.
    CXX_STD="${HOROVOD_CXX_STANDARD:-$("$PY" -c '
import os, torch
h = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
try:
    text = open(h).read()
except OSError:
    text = ""
print(20 if "C++20 or later" in text else 17)')}"
    for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
        sed -i -E "s/set\(CMAKE_CXX_STANDARD 14\)/set(CMAKE_CXX_STANDARD $CXX_STD)/" "$f"
        if grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || ! grep -q "set(CMAKE_CXX_STANDARD $CXX_STD)" "$f"; then
            echo "install_horovod.sh: the C++$CXX_STD patch did not apply to $f" >&2
            exit 1
        fi
    done
    say "patched CMAKE_CXX_STANDARD 14 -> $CXX_STD (what torch $TORCH_VERSION's headers need)"

    # A CUDA build of torch makes Horovod's CMake compile its CUDA parts (even for the cpu
    # variant), so it needs the toolkit: point it at a real toolkit directory (a wrapper
    # script named nvcc on PATH is not enough for CMake's FindCUDAToolkit).
    TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
    if [ -n "$TORCH_CUDA" ]; then
        CUDA_ROOT="${HOROVOD_CUDA_HOME:-${CUDA_HOME:-${CUDA_PATH:-}}}"
        if [ -z "$CUDA_ROOT" ]; then
            for c in "${CONDA_PREFIX:-}" /usr/local/cuda "/usr/local/cuda-$TORCH_CUDA"; do
                if [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && { [ -f "$c/include/cuda_runtime.h" ] || \
                        [ -f "$c/targets/x86_64-linux/include/cuda_runtime.h" ]; }; then CUDA_ROOT="$c"; break; fi
            done
        fi
        if [ -z "$CUDA_ROOT" ] && command -v nvcc >/dev/null 2>&1; then
            CUDA_ROOT="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
        fi
        if [ -z "$CUDA_ROOT" ] || { [ ! -f "$CUDA_ROOT/include/cuda_runtime.h" ] && \
                [ ! -f "$CUDA_ROOT/targets/x86_64-linux/include/cuda_runtime.h" ]; }; then
            echo "install_horovod.sh: torch $TORCH_VERSION is a CUDA $TORCH_CUDA build; building Horovod against it needs" >&2
            echo "  the CUDA toolkit (nvcc, headers, cudart). Install it and set CUDA_HOME, or use a CPU build of torch." >&2
            exit 1
        fi
        export HOROVOD_CUDA_HOME="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT" CUDAToolkit_ROOT="$CUDA_ROOT"
        say "torch is a CUDA $TORCH_CUDA build: using the CUDA toolkit at $CUDA_ROOT"
    fi

    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    unset HOROVOD_WITH_MPI HOROVOD_WITHOUT_MPI HOROVOD_GPU_OPERATIONS || true
    case "$VARIANT" in *+mpi) export HOROVOD_WITH_MPI=1 ;; *) export HOROVOD_WITHOUT_MPI=1 ;; esac
    case "$VARIANT" in
        nccl*)
            export HOROVOD_GPU_OPERATIONS=NCCL
            if [ -z "${HOROVOD_NCCL_HOME:-}" ]; then
                # The nvidia-nccl wheel torch depends on has include/nccl.h and lib/libnccl.so.2
                # but no unversioned libnccl.so: link against it through a private prefix.
                NCCL_PKG="$("$PY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null || true)"
                if [ -n "$NCCL_PKG" ] && [ -f "$NCCL_PKG/include/nccl.h" ]; then
                    mkdir -p "$WORK/nccl/lib"
                    ln -s "$NCCL_PKG/include" "$WORK/nccl/include"
                    for so in "$NCCL_PKG"/lib/libnccl.so*; do ln -s "$so" "$WORK/nccl/lib/"; done
                    [ -e "$WORK/nccl/lib/libnccl.so" ] || ln -s "$(ls "$NCCL_PKG"/lib/libnccl.so.* | head -n 1)" "$WORK/nccl/lib/libnccl.so"
                    export HOROVOD_NCCL_HOME="$WORK/nccl"
                fi
            fi
            export HOROVOD_NCCL_LINK="${HOROVOD_NCCL_LINK:-SHARED}"
            say "NCCL build: CUDA at $HOROVOD_CUDA_HOME, NCCL at ${HOROVOD_NCCL_HOME:-<system>}"
            ;;
    esac
    JOBS="${HOROVOD_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
    export MAKEFLAGS="${MAKEFLAGS:--j$JOBS}"

    say "building the wheel (a few minutes; log in $WORK/build.log)"
    if ! "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/wheel" "$SRC" >"$WORK/build.log" 2>&1; then
        tail -n 60 "$WORK/build.log" >&2
        echo "install_horovod.sh: the horovod build failed (full log above, last 60 lines)" >&2
        exit 1
    fi
    BUILT="$(ls "$WORK"/wheel/horovod-*.whl | head -n 1)"
    # Publish into the cache atomically (a concurrent build never sees a partial wheel).
    mkdir -p "$CACHE_ROOT"
    STAGE="$(mktemp -d "$CACHE_ROOT/.${KEY}.XXXXXX")"
    cp "$BUILT" "$STAGE/"
    rm -rf "$CACHE_DIR"
    mv "$STAGE" "$CACHE_DIR"
    WHEEL="$(find_wheel)"
    say "cached $WHEEL"
else
    say "using cached wheel $WHEEL"
fi

if [ "$BUILD_ONLY" = 1 ]; then
    echo "$WHEEL"
    exit 0
fi

# Runtime requirements of horovod (cloudpickle, psutil, pyyaml, packaging, cffi) come from
# the index when missing; --force-reinstall only of horovod itself.
if [ "$FORCE" = 1 ]; then
    "$PY" -m pip install --force-reinstall --no-deps "$WHEEL"
fi
"$PY" -m pip install "$WHEEL"
"$PY" -c "import horovod.torch as hvd; print('[install_horovod] horovod', __import__('horovod').__version__, 'gloo built:', hvd.gloo_built(), 'mpi built:', hvd.mpi_built(), 'nccl built:', hvd.nccl_built())"
