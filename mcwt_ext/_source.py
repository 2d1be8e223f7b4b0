"""The digest of what ``pip install .`` builds and installs: ``setup.py``, ``pyproject.toml``,
``csrc/`` and the package's Python files.

setup.py compiles it into ``mcwt_ext._C`` (``_extension.BUILT_SOURCE_SHA256``), and
``python mcwt_ext/_source.py [ROOT]`` prints a checkout's (standard library only: it runs before
anything is built); ``--check ROOT`` tells whether the importable mcwt_ext was built from it, so
``scripts/install.sh`` and the GPU scripts skip a build that already matches the checkout. Run it
by path from outside the
checkout, so that ``import mcwt_ext`` finds the installed package, not the source tree.
"""
import hashlib
import os
import sys


def source_digest(root: str) -> str:
    """sha256 over the relative paths and contents of ``root``'s setup.py, pyproject.toml, csrc/
    files and mcwt_ext/ Python files (not the compiled ``_C``, not bytecode)."""
    def files(folder, keep):
        top = os.path.join(root, folder)
        return [os.path.relpath(os.path.join(d, f), root) for d, dirs, names in os.walk(top)
                for f in names if keep(f) and "__pycache__" not in d]
    rels = ["setup.py", "pyproject.toml"] + sorted(files("csrc", lambda f: True) +
                                                   files("mcwt_ext", lambda f: f.endswith(".py")))
    digest = hashlib.sha256()
    for rel in rels:
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(rel.replace(os.sep, "/").encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def check(root: str, cuda: bool = False) -> tuple[bool, str]:
    """Whether the importable mcwt_ext was built from ``root``'s sources (with CUDA kernels if
    ``cuda``), and why (or why not)."""
    want = source_digest(root)
    try:
        from mcwt_ext import _extension as ext
    except ImportError as e:
        return False, f"no usable build of mcwt_ext: {' '.join(str(e).split())}"
    built = getattr(ext, "BUILT_SOURCE_SHA256", None)  # None: a build older than the digest
    if built != want:
        return False, f"the installed build is of other sources ({built}; this checkout: {want})"
    if cuda and not ext.HAS_CUDA_KERNELS:
        return False, "the installed build has no CUDA kernels"
    return True, (f"the installed build matches this checkout (sources {want[:12]}, torch "
                  f"{ext.BUILT_TORCH_VERSION}, CUDA kernels {ext.BUILT_CUDA_VERSION})")


if __name__ == "__main__":
    # python mcwt_ext/_source.py [ROOT]                -> the digest of ROOT (default: this checkout)
    # python mcwt_ext/_source.py --check ROOT [--cuda] -> exit 0 if the importable build is ROOT's
    args = sys.argv[1:]
    if args[:1] == ["--check"]:
        ok, why = check(args[1], cuda="--cuda" in args[2:])
        print(why)
        sys.exit(0 if ok else 1)
    print(source_digest(args[0] if args else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
