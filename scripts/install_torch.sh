#!/usr/bin/env bash
# Install a torch build that fits this machine into the virtual environment given as $1.
# - torch already importable there (for example a CUDA build the user installed): keep it.
# - a GPU (nvidia-smi answers): the default PyPI wheel, which is a CUDA build.
# - no GPU: the CPU wheel of TORCH_VERSION, from a local wheel directory when pip's
#   find-links has one, otherwise from PyTorch's CPU index, never the multi-GB CUDA build.
set -euo pipefail
venv_python="$1"
torch_version="${TORCH_VERSION:-2.13.0}"

if "$venv_python" -c "import torch" >/dev/null 2>&1; then
  echo "torch $("$venv_python" -c 'import torch; print(torch.__version__)') already installed: kept"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$venv_python" -m pip install "torch>=2.4"
  exit 0
fi
# A local wheel (pip's find-links) is taken without asking any index; its dependencies
# (filelock, sympy, ...) then come from the usual index.
if "$venv_python" -m pip install --quiet --no-deps --no-index --only-binary=:all: "torch==${torch_version}" >/dev/null 2>&1; then
  "$venv_python" -m pip install --quiet "torch==${torch_version}"
  echo "torch ${torch_version} installed from the local wheel directory"
  exit 0
fi
"$venv_python" -m pip install "torch==${torch_version}" \
  --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
