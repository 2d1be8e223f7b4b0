"""Build of mcwt_ext and its compiled ops, mcwt_ext._C.

A CUDAExtension when a GPU is visible to torch and nvcc is found (CUDA_HOME,
CUDA_PATH or /usr/local/cuda), else a CppExtension: the convention of torch
extension packages, so a GPU-less install does not spend minutes in nvcc.
Switches: MCWT_FORCE_CUDA=1 (CUDA kernels or fail, e.g. CI or a build host
without a GPU), MCWT_FORCE_CPU=1 (CPU kernels only). Without a visible GPU,
TORCH_CUDA_ARCH_LIST defaults to DEFAULT_ARCH_LIST.

    pip install --no-build-isolation .                  # into an env that has torch
    python setup.py build_ext --inplace                 # development build
"""
import glob
import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100/H200; PTX for newer GPUs


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


# torch.utils.cpp_extension reads CUDA_HOME when imported and otherwise guesses
# from the nvcc on PATH (here a wrapper in /usr/local/bin, so it would pick
# /usr/local and fail to link -lcudart): pin it first.
CUDA_HOME = _cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    force_cuda, force_cpu = _env_flag("MCWT_FORCE_CUDA"), _env_flag("MCWT_FORCE_CPU")
    if force_cuda and force_cpu:
        raise SystemExit("mcwt_ext: set at most one of MCWT_FORCE_CUDA and MCWT_FORCE_CPU")
    if force_cpu:
        return False
    have_nvcc = CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if force_cuda:
        if not have_nvcc:
            raise SystemExit(f"mcwt_ext: MCWT_FORCE_CUDA=1 but no nvcc under CUDA_HOME={CUDA_HOME!r}")
        if torch.version.cuda is None:
            raise SystemExit(f"mcwt_ext: MCWT_FORCE_CUDA=1 but torch {torch.__version__} has no CUDA")
        return True
    # torch.cuda.is_available() does not create a CUDA context (NVML query).
    return have_nvcc and torch.version.cuda is not None and torch.cuda.is_available()


def _nvidia_include_dirs():
    """Headers of the pip CUDA packages (e.g. nvidia/cu13/include: curand, cub)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "cu[0-9]*", "include")))
    return dirs


def _sources(with_cuda):
    patterns = ["csrc/*.cpp", "csrc/cpu/*.cpp"] + (["csrc/cuda/*.cu"] if with_cuda else [])
    return [path for pattern in patterns for path in sorted(glob.glob(pattern, root_dir=ROOT))]


def _kernels_line(with_cuda):
    """The one line saying which kernels this build compiles, and why."""
    if with_cuda:
        why = "MCWT_FORCE_CUDA=1" if _env_flag("MCWT_FORCE_CUDA") else "a GPU is visible"
        return f"mcwt_ext: building C++ and CUDA kernels ({why})"
    if _env_flag("MCWT_FORCE_CPU"):
        why = "MCWT_FORCE_CPU=1"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} has no CUDA"
    elif CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        why = "no nvcc"
    else:
        why = "no GPU visible; MCWT_FORCE_CUDA=1 builds them anyway"
    return f"mcwt_ext: building C++ kernels only ({why})"


def _source_digest():
    """mcwt_ext/_source.py's digest of what this build installs (loaded by path: nothing is built yet)."""
    spec = importlib.util.spec_from_file_location("_mcwt_source", os.path.join(ROOT, "mcwt_ext", "_source.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest(ROOT)


def _extension():
    with_cuda = _want_cuda()
    print(_kernels_line(with_cuda), flush=True)
    # Bit-exact masks need unfused float arithmetic: no FMA contraction anywhere.
    # -fopenmp: at::parallel_for is an OpenMP region compiled into our code.
    # MCWT_SOURCE_SHA256 (mcwt.cpp): what was built, so a matching install can skip a rebuild.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp", f"-DMCWT_SOURCE_SHA256={_source_digest()}"]
    kwargs = dict(
        name="mcwt_ext._C",
        sources=_sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        return CppExtension(extra_compile_args={"cxx": cxx_flags}, **kwargs)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    kwargs["include_dirs"] += _nvidia_include_dirs()
    nvcc_flags = ["-O3", "--fmad=false", "-Xcompiler", "-ffp-contract=off"]
    return CUDAExtension(
        define_macros=[("MCWT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        **kwargs,
    )


setup(
    packages=find_packages(include=["mcwt_ext", "mcwt_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
