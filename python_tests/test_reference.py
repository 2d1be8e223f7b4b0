"""The main job's promise (README, Quick start): its table.csv is docs/results/digits/table.csv bit
for bit on the machine that made it, and within the stated tolerance on any other."""
import json
import re
import shlex
from pathlib import Path


from mcwt_ext.experiments import Grid
from mcwt_ext.experiments.reference import REFERENCE_DIR, compare_with_reference, main_job_reference
from mcwt_ext.experiments.report import read_table_csv, write_table_csv

ROOT = Path(__file__).resolve().parent.parent
DOCS_TABLE = ROOT / "docs" / "results" / "digits" / "table.csv"


def _main_job_args() -> list[str]:
    """The reproduce arguments of the README's main-job command, without --out."""
    quick = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    line = re.search(r"\.venv/bin/mcwt (reproduce [^\n]*)", quick).group(1)
    args = shlex.split(line)
    i = args.index("--out")
    return args[:i] + args[i + 2:]


def _grid(args: list[str], out) -> Grid:
    from mcwt_ext.cli import build_parser

    ns = build_parser().parse_args([*args, "--out", str(out)])
    return Grid(archs=ns.arch, seeds=list(range(ns.seeds)), dataset=ns.dataset, out=out, protocol=ns.protocol,
                iterations=ns.iterations, eval_every=ns.eval_every, methods=ns.methods)


def test_packaged_reference_is_the_docs_table():
    assert (REFERENCE_DIR / "digits_table.csv").read_bytes() == DOCS_TABLE.read_bytes()
    meta = json.loads((REFERENCE_DIR / "digits_table.json").read_text())
    assert (ROOT / meta["docs"]).is_dir() and (ROOT / meta["docs"] / "README.md").is_file()


def test_only_the_main_job_has_a_reference(tmp_path):
    args = _main_job_args()
    assert main_job_reference(_grid(args, tmp_path)) is not None
    other = [*args[:args.index("--seeds")], "--seeds", "3", *args[args.index("--seeds") + 2:]]
    assert main_job_reference(_grid(other, tmp_path)) is None
    assert main_job_reference(_grid([*args, "--methods", "all"], tmp_path)) is None


def _perturbed(tmp_path, **shift) -> Path:
    rows = read_table_csv(DOCS_TABLE)
    for col, (index, by) in shift.items():
        rows[index][col] += by
    write_table_csv(rows, tmp_path / "table.csv")
    return tmp_path / "table.csv"


def test_verdicts(tmp_path):
    ref = main_job_reference(_grid(_main_job_args(), tmp_path))
    assert compare_with_reference(DOCS_TABLE, ref).kind == "bit for bit"
    tol = ref.tolerance
    near = compare_with_reference(_perturbed(tmp_path, mean=(2, tol["mean"] / 2), std=(7, -tol["std"] / 2)), ref)
    assert near.kind == "within the tolerance" and near.beyond == 0 and len(near.cells) == 2
    far = compare_with_reference(_perturbed(tmp_path, mean=(3, 2 * tol["mean"])), ref)
    assert far.kind == "not within the tolerance" and far.beyond == 1
    assert any(c.startswith("val_acc_early_stop mcwt_magnitude conv2 mean") and c.endswith("(beyond)")
               for c in far.cells)
    lines = far.lines(ref)
    assert "not within the tolerance" in lines[0] and len(lines) == 2


