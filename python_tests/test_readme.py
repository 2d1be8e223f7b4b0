"""The README's "Using it on your own model" example runs as written (CPU)."""
import re
from pathlib import Path

import torch

from test_sample import FIT

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    section = README.read_text().split("## Using it on your own model", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_own_model_example_runs(tmp_path, monkeypatch):
    FIT.save(tmp_path / "fit.json")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(_example(), "README.md", "exec"), scope)
    model, masks = scope["model"], scope["masks"]
    assert len(masks) == 21 and list(masks)[0] == "conv1.weight" and list(masks)[-1] == "fc.weight"
    assert torch.equal(model.layer1[0].conv1.weight_mask.bool(), masks["layer1.0.conv1.weight"])
    assert all(abs(m.double().mean().item() - 0.2) < 0.02 for m in masks.values() if m.numel() > 10_000)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def _prose() -> str:
    return " ".join(README.read_text().split())


def test_the_commands_that_write_no_run_directory_are_named():
    """The README's "Every command but fit and plot writes a run directory" is what the parser
    declares (the kind of --out each command's errors name)."""
    from mcwt_ext.cli import build_parser

    kinds = {name: p.get_default("out_kind") or "run" for name, p in build_parser().commands.items()}
    assert {name: k for name, k in kinds.items() if k not in ("run", "grid")} == {"fit": "file", "plot": "folder"}
    assert kinds["reproduce"] == "grid"
    assert "Every command but `fit` and `plot` writes a run directory (`--out`; `reproduce` a grid of them)" \
        in _prose() and "`mcwt fit --out` writes one JSON file, `mcwt plot --out` a folder" in _prose()


def test_the_shard_rule_counts_chains_from_1():
    """shard_cells gives chain j (from 1) to shard (j - 1) mod N + 1 (test_grid_packs checks it)."""
    assert "Chain j, counted from 1 in grid order, goes to task (j - 1) mod N + 1 (chain 1 to task 1" in _prose()


# --- every shell block, run as written from the Quick start's state ------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from readme_blocks import ROOT, block, explain, run_block, sandbox, shell_blocks  # noqa: E402

#: A phrase of each README shell block -> the test that runs that block as written.
CLAIMS = {
    "bash scripts/install.sh && .venv/bin/mcwt reproduce": "test_main_job_block_runs_as_written",
    "bash scripts/install.sh --test && .venv/bin/pytest": "test_test_block_is_what_ci_runs",
    "torchrun": "test_distributed.py::test_readme_torchrun_command_runs",
    "sbatch": "test_job_array_block_runs_as_written",
    "--executor ray": "test_grid_ray.py::test_readme_ray_block_runs_as_written",
    "mcwt dst": "test_dst.py::test_readme_block_runs_as_written",
}


def test_every_shell_block_is_run_by_a_test():
    blocks = shell_blocks()
    for text in blocks:
        claims = [k for k in CLAIMS if k in text]
        assert len(claims) == 1, f"README block {text!r} is run by {len(claims)} tests (want 1): add it to CLAIMS"
    assert all(any(k in text for text in blocks) for k in CLAIMS), "a claimed README block is gone"


def test_test_block_is_what_ci_runs():
    """CI runs the README's test command itself (after forcing the CUDA kernels to compile)."""
    command = block("--test && .venv/bin/pytest").strip()
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def _quick_start_state(box):
    """The sandbox holds the Quick start's install of this checkout, or the test cannot mean
    anything (a developer who edited the sources without reinstalling): skip then."""
    check = subprocess.run(["bash", "scripts/install.sh", "--check"], cwd=box, capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"{check.stdout.strip()}: run the Quick start's install first (CI does)")


class _FakeSbatch:
    """A stand-in for Slurm's ``sbatch --array=A-B --wrap CMD``: runs CMD once per array index, all
    at once, with ``SLURM_ARRAY_TASK_ID`` set, waits for all, and exits with the worst status."""

    SCRIPT = r'''
import os, subprocess, sys
args, array, wrap = sys.argv[1:], None, None
while args:
    a = args.pop(0)
    if a.startswith("--array"):
        array = a.split("=", 1)[1] if "=" in a else args.pop(0)
    elif a.startswith("--wrap"):
        wrap = a.split("=", 1)[1] if "=" in a else args.pop(0)
first, last = (int(x) for x in array.split("-"))
procs = [subprocess.Popen(["bash", "-c", wrap], env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)})
         for i in range(first, last + 1)]
sys.exit(max(p.wait() for p in procs))
'''

    @classmethod
    def install(cls, folder):
        folder.mkdir()
        exe = folder / "sbatch"
        exe.write_text(f"#!{sys.executable}\n{cls.SCRIPT}")
        exe.chmod(0o755)
        return folder


@pytest.mark.slow
def test_job_array_block_runs_as_written(tmp_path):
    """The job-array example, as written, with a stand-in for sbatch (no Slurm here): every task
    of the array runs at once on the shared --out, and the grid ends with its table."""
    box = sandbox(tmp_path)
    text = block("sbatch")
    done = run_block(text, box, timeout=900, path=_FakeSbatch.install(tmp_path / "bin"))
    assert done.returncode == 0, explain(done)
    out = box / re.search(r"--out (\S+)", text).group(1)
    assert (out / "table.csv").is_file(), explain(done)


#: The x86 instruction set every x86-64 CPU has: the arithmetic of "another machine" (issue 17).
BASELINE_X86 = dict(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")
#: ... on one thread: another summation order, and it keeps off the other test worker's core.
ONE_THREAD = dict(OMP_NUM_THREADS="1")


@pytest.mark.slow
@pytest.mark.numerics
def test_main_job_block_runs_as_written(tmp_path):
    """The Quick start's main job, as written, from the Quick start's state (its install step finds
    the build there and skips it), under the baseline x86 arithmetic and one thread, unlike the
    machine that made the reference; it keeps the README's promise (docs/results/digits/README.md)."""
    box = sandbox(tmp_path)
    _quick_start_state(box)
    done = run_block(block("bash scripts/install.sh && .venv/bin/mcwt reproduce"), box, timeout=1500,
                     env={**BASELINE_X86, **ONE_THREAD})
    assert done.returncode == 0, explain(done)
    assert "build: skipped" in done.stdout, explain(done)
    # the promise: every cell of table.csv within the reference's tolerance, and the command says so
    from test_reference import DOCS_TABLE, _grid, _main_job_args
    from mcwt_ext.experiments.reference import main_job_reference
    from mcwt_ext.experiments.report import read_table_csv

    out = box / "runs" / "digits"
    ref = main_job_reference(_grid(_main_job_args(), out))
    got = {(r["metric"], r["method"]): r for r in read_table_csv(out / "table.csv")}
    want = {(r["metric"], r["method"]): r for r in read_table_csv(DOCS_TABLE)}
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        assert (g["n"], g["paper"]) == (w["n"], w["paper"]), key
        assert abs(g["mean"] - w["mean"]) <= ref.tolerance["mean"], (key, g, w)
        assert abs(g["std"] - w["std"]) <= ref.tolerance["std"], (key, g, w)
    assert re.search(r"main job's reference \S+: (bit for bit|within the tolerance)", done.stdout), explain(done)
