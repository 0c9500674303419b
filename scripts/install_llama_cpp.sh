#!/usr/bin/env bash
# Install llama-cpp-python (the runtime the GGUF tests check against) into the venv given as $1.
#
# pip builds llama.cpp from source, by default for the build machine's own CPU (GGML_NATIVE):
# on a CPU that advertises AMX that build executes AMX tile instructions, which a virtual machine
# that does not enable AMX state for its guests kills with a general protection fault (measured:
# `ldtilecfg` in libggml-cpu.so, on every model, with or without an adapter). The tests need a
# reference reader, not the fastest one, so this builds a portable x86-64 AVX2 variant once, keeps
# the wheel in a cache directory named after those flags (pip's own wheel cache ignores CMAKE_ARGS
# and would hand back a native build), and installs from there.
set -euo pipefail
venv_python="$1"
spec="${LLAMA_CPP_SPEC:-llama-cpp-python>=0.3.16}"
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ "$(uname -m)" != "x86_64" ]; then
  flags="-DGGML_NATIVE=OFF"
fi
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/qlorakit/wheels/llama-cpp-python-$(printf '%s' "$flags" | sha256sum | cut -c1-12)"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python for the tests ($flags): about 8 minutes on 2 cores, once per machine"
  mkdir -p "$wheels.tmp"
  CMAKE_ARGS="$flags" "$venv_python" -m pip wheel --quiet --no-deps --no-cache-dir "$spec" -w "$wheels.tmp"
  rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi
"$venv_python" -m pip install --quiet --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
"$venv_python" -m pip install --quiet "$spec" --find-links "$wheels"  # its dependencies (numpy, jinja2, diskcache)
