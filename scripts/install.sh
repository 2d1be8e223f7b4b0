#!/usr/bin/env bash
# Set up mcwt_ext from a fresh clone: a virtual environment in .venv with torch, the
# package itself built from source (C++ kernels always; CUDA kernels when nvcc is found),
# and with --test the test tools. Safe to re-run: what is already there is kept.
#
#   bash scripts/install.sh          # venv + torch + mcwt_ext (console script .venv/bin/mcwt)
#   bash scripts/install.sh --test   # the same, plus pytest
#
# Environment: PYTHON (default python3), TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1"),
# MCWT_FORCE_CPU=1 / MCWT_FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST are passed on to setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel ninja pybind11 >/dev/null
# torch first: the build compiles against it (no build isolation, which would fetch a second,
# multi-GB copy into a throw-away environment).
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || $PIP install -q $TORCH_SPEC
[[ -n "${CUDA_HOME:-}" || ! -d /usr/local/cuda ]] || export CUDA_HOME=/usr/local/cuda
$PIP install -q --no-build-isolation ".$extra"
# Import from outside the checkout, so the installed package (not the source tree) is checked.
(cd / && "$OLDPWD/.venv/bin/python" -c "from mcwt_ext import _extension as e; \
print(f'mcwt_ext installed: torch {e.BUILT_TORCH_VERSION}, CUDA kernels: {e.BUILT_CUDA_VERSION or \"none\"}')")
