"""The README and the docs it links to say what the code does: the "Using it on your own model"
example and every shell block run as written (CPU), the worked example prints what the README
shows, the sentences other code relies on are there, and every relative link resolves."""
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


def _prose(name: str) -> str:
    from readme_blocks import prose

    return prose(name)


def test_the_commands_that_write_no_run_directory_are_named():
    """docs/cli.md's "Every command but fit and plot writes a run directory" is what the parser
    declares (the kind of --out each command's errors name)."""
    from mcwt_ext.cli import build_parser

    kinds = {name: p.get_default("out_kind") or "run" for name, p in build_parser().commands.items()}
    assert {name: k for name, k in kinds.items() if k not in ("run", "grid")} == {"fit": "file", "plot": "folder"}
    assert kinds["reproduce"] == "grid"
    assert "Every command but `fit` and `plot` writes a run directory (`--out`; `reproduce` a grid of them)" \
        in _prose("docs/cli.md") and "`mcwt fit --out` writes one JSON file, `mcwt plot --out` a folder" \
        in _prose("docs/cli.md")


def test_the_shard_rule_counts_chains_from_1():
    """shard_cells gives chain j (from 1) to shard (j - 1) mod N + 1 (test_grid_packs checks it)."""
    assert "Chain j, counted from 1 in grid order, goes to task (j - 1) mod N + 1 (chain 1 to task 1" \
        in _prose("docs/scaling.md")


# --- every shell block, run as written from the Quick start's state ------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from readme_blocks import DOCS, ROOT, block, explain, run_block, sandbox, shell_blocks  # noqa: E402

#: A phrase of each shell block of the README and its docs (readme_blocks.DOCS) -> the test that
#: runs that block as written.
CLAIMS = {
    "bash scripts/install.sh && .venv/bin/mcwt reproduce": "test_main_job_block_runs_as_written",
    "bash scripts/install.sh --test && .venv/bin/pytest": "test_test_block_is_what_ci_runs",
    "mcwt plot --ticket": "test_worked_example_runs_as_written",
    "torchrun": "test_distributed.py::test_readme_torchrun_command_runs",
    "sbatch": "test_job_array_block_runs_as_written",
    "--executor ray": "test_grid_ray.py::test_readme_ray_block_runs_as_written",
    "mcwt dst": "test_dst.py::test_readme_block_runs_as_written",
}


def test_every_shell_block_is_run_by_a_test():
    blocks = shell_blocks()
    for text in blocks:
        claims = [k for k in CLAIMS if k in text]
        assert len(claims) == 1, f"shell block {text!r} is run by {len(claims)} tests (want 1): add it to CLAIMS"
    assert all(any(k in text for text in blocks) for k in CLAIMS), "a claimed shell block is gone"
    # a new page of docs/ (not the results, which hold the commands that made them) is searched too
    assert set(ROOT.glob("docs/*.md")) == set(DOCS[1:]), "add the new docs/*.md to readme_blocks.DOCS"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves():
    """Every relative link of the README and its docs names a file of the checkout, and an anchor
    (#...) a heading of the file it points to."""
    bad = []
    for page in DOCS:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, bad


def test_torch_spec_reaches_pip_as_separate_arguments():
    """The README tells a CPU-only install to put pip's --index-url into TORCH_SPEC: install.sh
    must hand it to pip unquoted (split on spaces), and only when the venv has no torch."""
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert re.search(r"^  \$PIP install \$QUIET \$TORCH_SPEC$", script, re.M)
    assert 'TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}' in script
    assert "torch: already installed" in script
    readme = README.read_text()
    assert 'TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"' in readme


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


_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)")


def _tokens(line: str) -> list[str]:
    """``line``, spacing collapsed, as its runs of text and its numbers."""
    return [t for t in _NUMBER.split(" ".join(line.split())) if t]


def _near(shown: str, got: str) -> bool:
    """Integers equal; other numbers within 0.1, or 10% above 1 (float rounding grown through
    training on another CPU: docs/determinism.md)."""
    if "." not in shown:
        return shown == got
    return abs(float(shown) - float(got)) <= 0.1 * max(1.0, abs(float(shown)))


def _says(shown: str, line: str) -> bool:
    """``line`` says what the README's ``shown`` says: the same words, numbers ``_near``; a
    ``shown`` ending in "..." only the start of ``line``."""
    prefix = shown.endswith("...")
    want, got = _tokens(shown.removesuffix("...").rstrip()), _tokens(line)
    if len(got) < len(want) or (not prefix and len(got) != len(want)):
        return False
    for i, (w, g) in enumerate(zip(want, got)):
        if _NUMBER.fullmatch(w):
            if not (_NUMBER.fullmatch(g) and _near(w, g)):
                return False
        elif not (w == g or (prefix and i == len(want) - 1 and g.startswith(w))):
            return False
    return True


def test_says_reads_the_shown_output_as_meant():
    assert _says("  \"test_acc_early_stop\": 0.9696969696969697,", '  "test_acc_early_stop": 0.9461279461279462,')
    assert not _says('  "test_acc_early_stop": 0.96,', '  "val_acc_early_stop": 0.96,')
    assert not _says('  "test_acc_early_stop": 0.96,', '  "test_acc_early_stop": 0.75,')
    assert _says("0.weight  conv    density 0.1944 (target 0.2000)  bias -6.291",
                 "      0.weight  conv    density 0.1990 (target 0.2000)  bias -6.300")
    assert not _says("0.weight  conv  density 0.1944", "2.weight  conv  density 0.1944")
    assert _says("wrote runs/mcwt/masks.safetensors in ...", "wrote runs/mcwt/masks.safetensors in 12.5 s")
    assert not _says("wrote runs/fit.json", "wrote runs/fit.json.tmp")


@pytest.mark.slow
def test_worked_example_runs_as_written(tmp_path):
    """The README's worked example (imp, fit, sample, train, plot on digits), as written, from the
    Quick start's state: every line the README shows under it is printed (stdout or stderr), and
    the figures are written."""
    box = sandbox(tmp_path)
    done = run_block(block("mcwt plot --ticket"), box, timeout=900)
    assert done.returncode == 0, explain(done)
    printed = (done.stdout + done.stderr).splitlines()
    section = README.read_text().split("## A worked example", 1)[1].split("\n## ", 1)[0]
    shown = re.search(r"```text\n(.*?)```", section, re.S).group(1).splitlines()
    shown = [s for s in shown if not s.startswith("$ ") and s.strip() != "..."]
    assert len(shown) > 15
    missing = [s for s in shown if not any(_says(s, line) for line in printed)]
    assert not missing, f"README lines not printed: {missing}; {explain(done)}"
    for name in ("fig1_initial_weights.png", "fig2b_connectivity.png"):
        assert (box / "runs" / "figures" / name).is_file()


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
