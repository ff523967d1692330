#!/usr/bin/env bash
# Build llama.cpp (from the llama-cpp-python sdist) outside the repo for the peer benchmark; not part of CI.
#
# Usage: tools/setup_llamacpp.sh [DEST]   (DEST defaults to /work/llamacpp)
# Then: benchmarks/peer_llamacpp.py reference/checkpoint --llamacpp DEST
# Builds llama-bench, llama-quantize and llama-perplexity with AMX off (the native build dies with
# SIGILL at tileloadd here, see notes/llama-cpp-peer.md).
# Run llama.cpp with OMP_WAIT_POLICY=PASSIVE on a shared machine.
set -euo pipefail
DEST=${1:-/work/llamacpp}
PY=${PYTHON:-python3}
VERSION=0.3.36
mkdir -p "$DEST"
cd "$DEST"
if [ ! -d src ]; then
  # --no-binary for this package only: with :all: pip also builds its build dependencies (cmake,
  # scikit-build-core) from source just to read the sdist's metadata, which ran > 10 min here
  "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d dl
  mkdir -p src
  tar -xzf dl/llama_cpp_python-$VERSION.tar.gz -C src --strip-components=1
fi
LC=src/vendor/llama.cpp
# ISA extensions from this CPU's flags, not -march=native: AMX stays off (the native build dies with SIGILL
# at tileloadd here), and AVX-VNNI (the VEX form) is on only where the CPU has it — AMD EPYC has AVX-512
# VNNI but not AVX-VNNI, and a build with it crashes in llama-bench with an illegal instruction.
has() { grep -m1 '^flags' /proc/cpuinfo | grep -qw "$1" && echo ON || echo OFF; }
cmake -S "$LC" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
  -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni) \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
nice -n 10 cmake --build build -j 2 --target llama-bench llama-quantize llama-perplexity
# convert_hf_to_gguf.py puts its own gguf-py on sys.path; sentencepiece goes to DEST/pydeps, not the venv
# (the converter imports it before falling back to the BPE tokenizer.json).
"$PY" -m pip install -q --target "$DEST/pydeps" sentencepiece
echo "llama.cpp tools in $DEST/build/bin; converter: $DEST/$LC/convert_hf_to_gguf.py"
