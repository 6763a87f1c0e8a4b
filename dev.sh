#!/usr/bin/env bash
# One entry point for people and CI.
#   bash dev.sh demo     set up, then serve the dashboard (Voila) on the reference model; prints the URL
#   bash dev.sh test     set up (chromium included, for the browser tests), then run the whole test suite
#   bash dev.sh run      set up, then one `workbench run` on the reference model, printed as a table
#   bash dev.sh setup    only set up (.venv with torch, the package and its extras, llama.cpp; chromium)
#   bash dev.sh llama-bench   build llama.cpp's llama-bench for this CPU (bench/engines.py); prints its path
#   bash dev.sh gpu-site [DIR]  the packages a GPU machine without network lacks, in one folder (bench/gpu_check.sh)
# Re-running is fast: the install is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# CPU build by default; for CUDA use e.g. TORCH_SPEC="torch==2.13.0" PIP_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.workbench-setup" want
  want=$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  # torch first and pinned: a range left to pip would pull a multi-GB CUDA build.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "installing $TORCH_SPEC" >&2
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  fi
  echo "installing the workbench and its extras" >&2
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  ensure_llamacpp
  echo "$want" > "$stamp"
}

# llama.cpp's CMake flags for this CPU, from /proc/cpuinfo: GGML_NATIVE=OFF (a -march=native build dies with
# "Illegal instruction" on VMs that advertise AMX without allowing it), each x86 extension the CPU lists on,
# AMX always off.
llamacpp_cmake_args() {
  local flags args="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
  args="$args -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 bmi2:BMI2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI avx512f:AVX512 \
              avx512_vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case "$flags" in
      *" ${pair%%:*} "*) args="$args -DGGML_${pair#*:}=ON" ;;
      *) args="$args -DGGML_${pair#*:}=OFF" ;;
    esac
  done
  echo "$args"
}

# llama-cpp-python, compiled here once per CPU feature set and kept as a wheel (a later setup installs it in
# seconds). LLAMACPP=skip leaves it out: the llamacpp engine then says how to install it, its tests skip.
LLAMACPP_SPEC=${LLAMACPP_SPEC:-llama-cpp-python==0.3.36}
ensure_llamacpp() {
  if [ "${LLAMACPP:-build}" = skip ] || "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    return 0
  fi
  local args tag wheels
  args=${LLAMACPP_CMAKE_ARGS:-$(llamacpp_cmake_args)}
  tag=$(echo "$LLAMACPP_SPEC $args" | sha256sum | cut -c1-12)
  wheels="${WORKBENCH_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/workbench/wheels}/llama-cpp-$tag"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama.cpp ($LLAMACPP_SPEC) for this CPU: about 15 minutes on 2 cores, once" \
         "(kept in $wheels)" >&2
    rm -rf "$wheels.tmp.$$"
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "$VENV/bin/python" -m pip wheel -q --no-deps -w "$wheels.tmp.$$" "$LLAMACPP_SPEC"
    mkdir -p "$(dirname "$wheels")" && rm -rf "$wheels" && mv "$wheels.tmp.$$" "$wheels"
  fi
  "$VENV/bin/python" -m pip install -q "$wheels"/llama_cpp_python-*.whl
}

# Debian's chromium drives the browser tests (Playwright never downloads a browser here).
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1; then
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "chromium is not installed and this user cannot install it: browser tests will be skipped" >&2
      return 0
    fi
  fi
  echo "installing Debian's chromium (browser tests)" >&2
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
}

# llama.cpp's own llama-bench, from the same source and flags as the llama-cpp-python wheel (bench/engines.py
# compares the workbench's llama.cpp decode with it); prints its path.
llama_bench() {
  local args tag dir src
  args=${LLAMACPP_CMAKE_ARGS:-$(llamacpp_cmake_args)}
  tag=$(echo "$LLAMACPP_SPEC $args" | sha256sum | cut -c1-12)
  dir="${WORKBENCH_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/workbench/wheels}/llama-bench-$tag"
  if [ ! -x "$dir/llama-bench" ]; then
    echo "building llama.cpp's llama-bench for this CPU: about 15 minutes on 2 cores, once (kept in $dir)" >&2
    src=$(mktemp -d)
    "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$src" "$LLAMACPP_SPEC"
    tar xzf "$src"/*.tar.gz -C "$src"
    cmake -S "$src"/llama_cpp_python-*/vendor/llama.cpp -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF $(echo "$args" | sed 's/-DLLAMA_BUILD_TOOLS=OFF/-DLLAMA_BUILD_TOOLS=ON/') >/dev/null
    cmake --build "$src/build" --target llama-bench -j "$(nproc)" >/dev/null
    mkdir -p "$dir" && cp "$src/build/bin/llama-bench" "$dir/" && rm -rf "$src"
  fi
  echo "$dir/llama-bench"
}

# The packages a GPU machine without network access lacks for `bash bench/gpu_check.sh`, unpacked into one folder
# it puts first on PYTHONPATH (copy the folder along with the checkout). bitsandbytes keeps only the library of the
# GPU machine's CUDA (GPU_CUDA, default 130 for torch+cu130) and its CPU one: the whole wheel is 43 MB, the folder
# about 24 MB with torchao. The wheels are pure Python or abi3: the folder serves the GPU machine's Python, whatever
# this one is.
GPU_SITE_PACKAGES=${GPU_SITE_PACKAGES:-"bitsandbytes==0.50.2 torchao==0.17.0 gguf==0.19.0"}
gpu_site() {
  local dir=${1:-.gpu-site} cuda=${GPU_CUDA:-130} tmp whl
  tmp=$(mktemp -d)
  # shellcheck disable=SC2086 # the package list is meant to split
  "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" $GPU_SITE_PACKAGES
  rm -rf "$dir" && mkdir -p "$dir"
  for whl in "$tmp"/*.whl; do "$VENV/bin/python" -m zipfile -e "$whl" "$dir"; done
  find "$dir/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cuda$cuda.so" \
    ! -name 'libbitsandbytes_cpu.so' -delete
  rm -rf "$tmp" "$dir/test"  # torchao's wheel carries its own tests as a top-level package named `test`
  echo "$dir: $(du -sh "$dir" | cut -f1) ($GPU_SITE_PACKAGES; bitsandbytes for CUDA ${cuda:0:2}.${cuda:2})"
}

case "${1:-demo}" in
  setup) setup; ensure_chromium ;;
  demo)
    setup
    shift || true
    "$VENV/bin/workbench" dashboard "$@"
    ;;
  run)
    setup
    shift || true
    "$VENV/bin/workbench" run --model tiny "$@"
    ;;
  test)
    setup
    ensure_chromium
    shift || true
    # Two workers (pytest-xdist): tests that wait (browsers, servers, subprocesses) overlap with ones that compute;
    # WORKBENCH_TEST_WORKERS=0 runs them in this process. tests/conftest.py orders and groups the work.
    "$VENV/bin/python" -m pytest -n "${WORKBENCH_TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder "$@"
    ;;
  llama-bench) setup; llama_bench ;;
  gpu-site) setup; shift; gpu_site "$@" ;;
  *) echo "usage: bash dev.sh [demo|test|run|setup|llama-bench|gpu-site] [extra args]" >&2; exit 2 ;;
esac
