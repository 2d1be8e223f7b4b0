#!/usr/bin/env bash
# Set up mcwt_ext from a fresh clone: a virtual environment in .venv with torch, the
# package itself built from source (C++ kernels always; CUDA kernels when a GPU is visible
# and nvcc is found, or with MCWT_FORCE_CUDA=1), and with --test the test tools and Ray. Safe to
# re-run: what is already there is kept. Prints one line per stage; pip's own progress
# shows on a terminal (on a pipe or in CI, pip stays quiet and the stage lines remain).
#
#   bash scripts/install.sh          # venv + torch + mcwt_ext (console script .venv/bin/mcwt)
#   bash scripts/install.sh --test   # the same, plus pytest and Ray (the test and ray extras: the
#                                    # suite runs reproduce --executor ray on a local Ray instance)
#   bash scripts/install.sh --check  # only say whether the build is this checkout's (exit 0) or not (1)
#
# The build is skipped when the installed mcwt_ext was built from these very sources (the digest of
# setup.py, pyproject.toml, csrc/ and the package's Python files that setup.py compiles into _C:
# mcwt_ext/_source.py --check), the test tools and Ray are there if --test asks for them, and the kernels asked for by
# MCWT_FORCE_CUDA / MCWT_FORCE_CPU are the ones built; so rerunning it is quick.
#
# Environment: PYTHON (default python3), TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1"),
# MCWT_FORCE_CPU=1 / MCWT_FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST are passed on to setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
extra="" check=""
case "${1:-}" in
  --test) extra="[test,ray]" ;;
  --check) check=1 ;;
  "") ;;
  *) echo "install.sh: unknown option ${1} (use --test or --check)" >&2; exit 2 ;;
esac
gpu_visible() { .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
# Up to date: the installed build is of these sources (mcwt_ext/_source.py), has the test tools and Ray if asked, imports, and
# has the kernels a forcing variable asks for.
up_to_date() {
  [[ -x .venv/bin/python ]] || return 1
  (cd / && "$OLDPWD/.venv/bin/python" "$OLDPWD/mcwt_ext/_source.py" --check "$OLDPWD" >/dev/null 2>&1) || return 1
  [[ -z $extra ]] || .venv/bin/python -c "import pytest, xdist, ray" 2>/dev/null || return 1
  local cuda
  cuda=$(cd / && "$OLDPWD/.venv/bin/python" -c "from mcwt_ext import _extension as e; print(e.BUILT_CUDA_VERSION or '')" 2>/dev/null) || return 1
  if [[ -n "${MCWT_FORCE_CPU:-}" ]]; then [[ -z $cuda ]]; return; fi
  [[ -n $cuda ]] && return 0  # CUDA kernels built: nothing more to want
  [[ -z "${MCWT_FORCE_CUDA:-}" ]] || return 1
  ! gpu_visible  # without a GPU the C++ kernels are what a build would make
}
if [[ -n $check ]]; then
  if up_to_date; then echo "install.sh: .venv holds the build of this checkout"; exit 0; fi
  echo "install.sh: .venv does not hold the build of this checkout"; exit 1
fi
# On a terminal pip draws its progress bars; elsewhere they would be megabytes of noise.
QUIET=""
[[ -t 1 ]] || QUIET="-q"
stage() { echo "[install $(date +%H:%M:%S)] $*"; }

stage "venv: .venv (python: $PYTHON)"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install $QUIET --upgrade pip setuptools wheel ninja pybind11
# torch first: the build compiles against it (no build isolation, which would fetch a second,
# multi-GB copy into a throw-away environment).
if .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  stage "torch: already installed ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
else
  stage "torch: installing $TORCH_SPEC (a few GB on first install, minutes)"
  $PIP install $QUIET $TORCH_SPEC
fi
[[ -n "${CUDA_HOME:-}" || ! -d /usr/local/cuda ]] || export CUDA_HOME=/usr/local/cuda
kernels="C++ kernels"
if [[ -n "${MCWT_FORCE_CUDA:-}" && -z "${MCWT_FORCE_CPU:-}" ]]; then
  kernels="C++ and CUDA kernels (MCWT_FORCE_CUDA), ~1 min per .cu file"
elif [[ -z "${MCWT_FORCE_CPU:-}" ]] && gpu_visible; then
  kernels="C++ and CUDA kernels (GPU visible), ~1 min per .cu file"
fi
if up_to_date; then
  stage "build: skipped, .venv already holds mcwt_ext$extra built from these sources"
else
  stage "build: mcwt_ext$extra from source, $kernels"
  $PIP install $QUIET --no-build-isolation ".$extra"
fi
# Import from outside the checkout, so the installed package (not the source tree) is checked.
(cd / && "$OLDPWD/.venv/bin/python" -c "from mcwt_ext import _extension as e; \
print(f'[install] done: mcwt_ext built against torch {e.BUILT_TORCH_VERSION}, CUDA kernels: {e.BUILT_CUDA_VERSION or \"none\"}')")
