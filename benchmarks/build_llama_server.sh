#!/usr/bin/env bash
# Builds upstream llama.cpp's llama-server, llama-quantize and llama-bench for the serving
# comparison in benchmarks/bench_serving.py and the single-stream one in
# benchmarks/bench_peers.py, from the llama.cpp tree vendored in PyPI's llama-cpp-python
# source distribution (PyPI is the registry this project's machines reach). An existing
# build is reused: only missing targets compile.
#
#   bash benchmarks/build_llama_server.sh [OUT]     # OUT default /tmp/r3mes-llama
#
# Leaves OUT/build/bin/{llama-server,llama-quantize,llama-bench} and the source tree in
# OUT/src (its convert_hf_to_gguf.py makes the GGUF: see benchmarks/export_gguf.py).
set -euo pipefail
OUT=${1:-/tmp/r3mes-llama}
VERSION=0.3.36
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$OUT"
if [ ! -f "llama_cpp_python-$VERSION.tar.gz" ]; then
  "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d .
fi
if [ ! -d src ]; then
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
  mv "llama_cpp_python-$VERSION/vendor/llama.cpp" src
  rm -rf "llama_cpp_python-$VERSION"
fi
cmake -S src -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF
cmake --build build --target llama-server llama-quantize llama-bench -j "$(nproc)"
"$PY" -m pip install -q sentencepiece  # export_gguf.py trains the GGUF tokenizer
echo "built: $OUT/build/bin/llama-server"
