#!/usr/bin/env bash
# Builds llama.cpp's `llama-batched-bench` (and, when named, `llama-server`) from the
# llama.cpp that llama-cpp-python 0.3.36 vendors (the same llama.cpp that parallel_gen runs
# on), into benchmarks/bin/.
#
#   benchmarks/build_batched_bench.sh                 # downloads the sdist with pip
#   benchmarks/build_batched_bench.sh llama-batched-bench llama-server   # targets to build
#   LLAMA_CPP_SDIST=/path/to/llama_cpp_python-0.3.36 benchmarks/build_batched_bench.sh
#                                                     # or: an extracted sdist / its .tar.gz
#
# Environment: JOBS (parallel compile jobs, default: all cores), NICE (nice level,
# default 19), CMAKE_ARGS (extra cmake arguments, e.g. -DGGML_CUDA=ON).
# Takes several minutes on 2 cores. Needs cmake, a C++17 compiler and pip.
set -euo pipefail

VERSION=0.3.36
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="$HERE/build"
BIN="$HERE/bin"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(llama-batched-bench)
SERVER=OFF
for t in "${TARGETS[@]}"; do [ "$t" = llama-server ] && SERVER=ON; done
NICE="${NICE:-19}"
mkdir -p "$WORK" "$BIN"

src="${LLAMA_CPP_SDIST:-}"
if [ -z "$src" ]; then
    if [ ! -d "$WORK/llama_cpp_python-$VERSION" ]; then
        echo "== downloading the llama-cpp-python==$VERSION sdist"
        python3 -m pip download --no-deps --no-binary :all: --no-build-isolation \
            -d "$WORK" "llama-cpp-python==$VERSION"
        tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
    fi
    src="$WORK/llama_cpp_python-$VERSION"
elif [ -f "$src" ]; then  # a .tar.gz
    tar -xzf "$src" -C "$WORK"
    src="$WORK/llama_cpp_python-$VERSION"
fi
LLAMA="$src/vendor/llama.cpp"
if [ ! -f "$LLAMA/tools/batched-bench/batched-bench.cpp" ]; then
    echo "error: $LLAMA has no tools/batched-bench (not a llama-cpp-python $VERSION sdist?)" >&2
    exit 1
fi

echo "== configuring $LLAMA"
# Tests, examples, the server (unless asked for) and the unified app are off only to save
# configure/build time; the targets below are all that gets built anyway.
# shellcheck disable=SC2086
nice -n "$NICE" cmake -S "$LLAMA" -B "$WORK/cmake" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER="$SERVER" -DLLAMA_BUILD_APP=OFF \
    ${CMAKE_ARGS:-}

for target in "${TARGETS[@]}"; do
    echo "== building $target with $JOBS jobs (nice $NICE)"
    nice -n "$NICE" cmake --build "$WORK/cmake" --target "$target" -j "$JOBS"
    exe="$(find "$WORK/cmake" -type f -name "$target" -perm -u+x | head -n 1)"
    if [ -z "$exe" ]; then
        echo "error: the build produced no $target" >&2
        exit 1
    fi
    cp "$exe" "$BIN/$target"
    echo "== built $BIN/$target"
    "$BIN/$target" --version 2>&1 | head -n 2 || true
done
