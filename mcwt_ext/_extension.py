"""Loads the compiled ops, ``mcwt_ext._C``, and checks it matches the running torch.

Importing this module registers the ``torch.ops.mcwt_ext`` operators. A failed
load is never swallowed: it raises ImportError saying why and how to rebuild.
"""
import re

import torch

_REBUILD = (
    "rebuild mcwt_ext against the installed torch: `pip install --no-build-isolation .` "
    "(or `python setup.py build_ext --inplace` in a source checkout)"
)

try:
    from . import _C
except ImportError as exc:
    raise ImportError(
        f"mcwt_ext: cannot load the compiled extension mcwt_ext._C ({exc}); "
        f"torch is {torch.__version__}. Was it built? {_REBUILD}"
    ) from exc


def _release(version):
    """'2.14.1+cu130' -> (2, 14, 1)."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", str(version))
    return tuple(int(part) for part in match.groups()) if match else None


def _cuda_release(cuda_version):
    """13000 (CUDA_VERSION) -> '13.0'; None for a build without CUDA kernels."""
    return f"{cuda_version // 1000}.{cuda_version % 1000 // 10}" if cuda_version else None


#: torch version whose headers _C was compiled against, e.g. '2.14.1'.
BUILT_TORCH_VERSION = _C.torch_version
#: CUDA toolkit the CUDA kernels were compiled with, e.g. '13.0'; None: CPU kernels only.
BUILT_CUDA_VERSION = _cuda_release(_C.cuda_version)
#: Whether the ops have CUDA kernels.
HAS_CUDA_KERNELS = BUILT_CUDA_VERSION is not None
#: Digest of the csrc/ and setup.py this binary was built from (mcwt_ext/_source.py); None
#: for a build made without it.
BUILT_SOURCE_SHA256 = getattr(_C, "source_sha256", None)


def check_build(built_torch, built_cuda, running_torch, running_cuda):
    """Raise ImportError unless a build (torch headers, CUDA kernels) suits the running torch."""
    if _release(running_torch) != _release(built_torch):
        raise ImportError(
            f"mcwt_ext._C was built against torch {built_torch} but torch {running_torch} is running; {_REBUILD}"
        )
    if built_cuda is None:
        return
    if running_cuda is None:
        raise ImportError(
            f"mcwt_ext._C has CUDA {built_cuda} kernels but torch {running_torch} is a CPU-only build; {_REBUILD}"
        )
    if running_cuda.split(".")[:2] != built_cuda.split("."):
        raise ImportError(
            f"mcwt_ext._C was compiled with CUDA {built_cuda} but torch uses CUDA {running_cuda}; {_REBUILD}"
        )


check_build(BUILT_TORCH_VERSION, BUILT_CUDA_VERSION, torch.__version__, torch.version.cuda)


def require_kernels(tensor, op):
    """Raise a readable error before dispatching a CUDA tensor to a CPU-only build."""
    if tensor.device.type == "cuda" and not HAS_CUDA_KERNELS:
        raise RuntimeError(
            f"{op}: mcwt_ext was built without CUDA kernels (no nvcc at build time, or "
            f"MCWT_FORCE_CPU=1); rebuild with nvcc available or MCWT_FORCE_CUDA=1"
        )
