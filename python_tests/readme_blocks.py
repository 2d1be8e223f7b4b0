"""The shell blocks of the README and of the docs it links to (``DOCS``), and a sandbox to run them
verbatim from the Quick start's state.

The sandbox is a temporary folder that looks like the checkout after the two Quick start commands:
links to the checkout's files and to the virtual environment running the tests (``.venv``), but
its own ``runs/``, so a block's output never lands in (or is read from) the developer's checkout.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import child_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: The README and the docs its text moved to: every ```bash block in them is run by a test
#: (test_readme.CLAIMS). The one list of them.
DOCS = [README, *(ROOT / "docs" / name for name in (
    "cli.md", "scaling.md", "gpu.md", "determinism.md", "results.md", "own-model.md", "internals.md"))]


def shell_blocks() -> list[str]:
    """Every ```bash block of the README and ``DOCS``, in order."""
    return [b for path in DOCS for b in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)]


def block(containing: str) -> str:
    """The one shell block (of the README and ``DOCS``) that contains ``containing``."""
    found = [b for b in shell_blocks() if containing in b]
    assert len(found) == 1, f"{len(found)} shell blocks of README.md and docs/ contain {containing!r}"
    return found[0]


def prose(*names: str) -> str:
    """The text of the named files of ``DOCS`` (``README.md``, ``docs/cli.md``, ...), whitespace
    collapsed, for checks of a sentence that may wrap anywhere."""
    paths = [p for p in DOCS if p.relative_to(ROOT).as_posix() in names]
    assert len(paths) == len(names), f"not in readme_blocks.DOCS: {names}"
    return " ".join(" ".join(p.read_text().split()) for p in paths)


def sandbox(tmp_path: Path) -> Path:
    """A folder holding the checkout (as links) and ``.venv`` (the running environment)."""
    box = tmp_path / "checkout"
    box.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".venv", "runs", ".git"):
            (box / entry.name).symlink_to(entry)
    (box / ".venv").symlink_to(Path(sys.prefix))
    return box


def run_block(text: str, cwd: Path, *, timeout: float, env: dict | None = None,
              path: Path | None = None) -> subprocess.CompletedProcess:
    """Run a README block as written with bash (errexit, pipefail), in ``cwd``; ``path``: a folder
    put first on PATH (stand-ins for a cluster's commands). The child imports the package under
    test (``conftest.child_env``)."""
    env = child_env(**(env or {}))
    if path is not None:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", "-eo", "pipefail", "-c", text], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def explain(done: subprocess.CompletedProcess) -> str:
    return f"rc {done.returncode}; stdout: {done.stdout[-2000:]}; stderr: {done.stderr[-3000:]}"
