"""The compiled extension: what it was built against, how it fails to load, its op schemas,
and which kernels setup.py builds."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcwt_ext import _extension

SAMPLING_SCHEMAS = {
    "logistic_bernoulli": "mcwt_ext::logistic_bernoulli(Tensor weight, Tensor? connectivity, float u_mag, "
                          "float u_conn, float bias, int seed, int offset) -> Tensor",
    "expected_density": "mcwt_ext::expected_density(Tensor weight, Tensor? connectivity, float u_mag, "
                        "float u_conn, float bias) -> Tensor",
    "logistic_topk": "mcwt_ext::logistic_topk(Tensor weight, Tensor? connectivity, float u_mag, "
                     "float u_conn, float bias, int k, int seed, int offset) -> Tensor",
}


def test_build_matches_running_torch():
    assert torch.__version__.startswith(_extension.BUILT_TORCH_VERSION)
    if _extension.HAS_CUDA_KERNELS:
        assert torch.version.cuda.split(".")[:2] == _extension.BUILT_CUDA_VERSION.split(".")


@pytest.mark.parametrize("built, running, match", [
    (("2.0.0", None), ("2.14.1+cu130", "13.0"), "built against torch 2.0.0 but torch 2.14.1"),
    (("2.14.1", "12.8"), ("2.14.1+cu130", "13.0"), "compiled with CUDA 12.8 but torch uses CUDA 13.0"),
    (("2.14.1", "13.0"), ("2.14.1+cpu", None), "CPU-only build"),
])
def test_mismatched_build_is_a_readable_import_error(built, running, match):
    with pytest.raises(ImportError, match=match) as info:
        _extension.check_build(*built, *running)
    assert "pip install --no-build-isolation" in str(info.value)


def test_matching_builds_pass():
    _extension.check_build("2.14.1", "13.0", "2.14.1+cu130", "13.0")
    _extension.check_build("2.14.1", None, "2.14.1+cpu", None)


ROOT = Path(__file__).resolve().parent.parent


def _python(args, **env):
    """Run a fresh interpreter the way a test should: no GPU (none of these needs one, and under
    xdist a dozen children would each create a CUDA context), one thread, a faulthandler dump in
    the captured output if it crashes, the parent's import path, and a timeout."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **env}
    return subprocess.run([sys.executable, "-X", "faulthandler", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_failed_load_names_the_cause_and_the_fix():
    # sys.modules[name] = None makes `from . import _C` fail as a missing binary would.
    code = "import sys; sys.modules['mcwt_ext._C'] = None; import mcwt_ext._extension"
    result = _python(["-c", code])
    assert "Fatal Python error" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert "ImportError: mcwt_ext: cannot load the compiled extension mcwt_ext._C" in result.stderr
    assert "halted; None in sys.modules" in result.stderr  # the cause, not swallowed
    assert "pip install --no-build-isolation" in result.stderr


@pytest.mark.parametrize("name", sorted(SAMPLING_SCHEMAS))
def test_sampling_schemas(name):
    assert str(getattr(torch.ops.mcwt_ext, name).default._schema) == SAMPLING_SCHEMAS[name]


MASKED_LAYER_SCHEMAS = {
    "masked_conv2d_relu_sums": "mcwt_ext::masked_conv2d_relu_sums(Tensor input, Tensor weight, Tensor mask, "
                               "Tensor? bias, int[2] padding, bool pool) -> (Tensor, Tensor)",
    "masked_linear_relu_sums": "mcwt_ext::masked_linear_relu_sums(Tensor input, Tensor weight, Tensor mask, "
                               "Tensor? bias) -> (Tensor, Tensor)",
}


@pytest.mark.parametrize("name", sorted(MASKED_LAYER_SCHEMAS))
def test_masked_layer_schemas(name):
    assert str(getattr(torch.ops.mcwt_ext, name).default._schema) == MASKED_LAYER_SCHEMAS[name]


# setup.py says which kernels it builds before building anything (`--version` builds nothing).
HAVE_NVCC = os.path.isfile(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))


def _setup_kernels_line(**env):
    flags = {"MCWT_FORCE_CUDA": "", "MCWT_FORCE_CPU": "", **env}
    result = _python(["setup.py", "--version"], **flags)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("mcwt_ext:")]
    return result.returncode, lines[-1] if lines else result.stderr


def test_setup_builds_cuda_kernels_only_with_a_visible_gpu_or_when_forced():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, as on a machine without one.
    code, line = _setup_kernels_line()
    assert code == 0 and line.startswith("mcwt_ext: building C++ kernels only ("), line
    code, line = _setup_kernels_line(MCWT_FORCE_CPU="1")
    assert code == 0 and line == "mcwt_ext: building C++ kernels only (MCWT_FORCE_CPU=1)"
    code, line = _setup_kernels_line(MCWT_FORCE_CPU="1", MCWT_FORCE_CUDA="1")
    assert code != 0 and line == "mcwt_ext: set at most one of MCWT_FORCE_CUDA and MCWT_FORCE_CPU"


@pytest.mark.skipif(not HAVE_NVCC or torch.version.cuda is None, reason="needs nvcc and a CUDA torch")
def test_setup_forced_cuda_builds_cuda_kernels_without_a_gpu():
    code, line = _setup_kernels_line(MCWT_FORCE_CUDA="1")
    assert code == 0 and line == "mcwt_ext: building C++ and CUDA kernels (MCWT_FORCE_CUDA=1)"
