"""scripts/gpu_check.sh and gpu_table1.sh (issue 18): plans that add up to the budget, inputs
checked first, the build skipped when the installed one matches, the CUDA test selection, and a
CPU rehearsal of a lease: two calls, the first stopped half way, the second finishing."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import IMPORT_ROOT, child_env

ROOT = Path(__file__).resolve().parent.parent
CHECK, TABLE1 = ROOT / "scripts" / "gpu_check.sh", ROOT / "scripts" / "gpu_table1.sh"


def _script(script, *args, timeout=60, **env):
    env = child_env(PYTHON=sys.executable, **{k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _plan(stdout):
    """[(name, limit, beside, what)] of a --dry-run, and its total line's (total, budget)."""
    steps, total = [], None
    for line in stdout.splitlines():
        if line.startswith("[plan] total "):
            words = line.split()
            total = (int(words[2]), int(words[-2]))
        elif line.startswith("[plan] "):
            head, what = line[len("[plan] "):].split(": ", 1)
            words = head.split()
            beside = words[4].rstrip(")") if len(words) > 4 else None
            steps.append((words[0], int(words[1]), beside, what))
    return steps, total


def _adds_up(steps, budget):
    assert sum(limit for _, limit, beside, _ in steps if beside is None) == budget
    assert all(limit <= dict((n, lim) for n, lim, b, _ in steps if b is None)[beside]
               for _, limit, beside, _ in steps if beside is not None)


def _summary(path):
    """{step: (exit, seconds, limit, status)} of a summary.md."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].lstrip("-").isdigit():
            rows[cells[0]] = (int(cells[1]), int(cells[2]), int(cells[3]), cells[4])
    return rows


@pytest.mark.parametrize("budget", [390, 500])
def test_gpu_check_plan_adds_up_to_its_budget_and_selects_the_cuda_tests(tmp_path, budget):
    assert subprocess.run(["bash", "-n", str(CHECK)]).returncode == 0
    result = _script(CHECK, "--dry-run", OUT=tmp_path / "out", WORK=tmp_path / "work", BUDGET_S=budget)
    assert result.returncode == 0, result.stderr
    steps, total = _plan(result.stdout)
    names = [s[0] for s in steps]
    assert names == ["env", "build", "import", "tests-cuda", "sanitizer-memcheck", "sanitizer-racecheck",
                     "sanitizer-synccheck", "bench-sampling", "bench-connectivity", "bench-training",
                     "bench-training-nets", "pack"]
    _adds_up(steps, budget)
    assert total == (budget, budget)
    what = {name: w for name, _, _, w in steps}
    assert "--no-build-isolation --no-deps --no-index" in what["build"]
    assert "python_tests -m needs_cuda" in what["tests-cuda"] and "sigint_module.py pytest" in what["tests-cuda"]
    for tool in ("memcheck", "racecheck", "synccheck"):  # the project's kernels only
        assert f"--tool {tool}" in what[f"sanitizer-{tool}"] and "--kernel-name kns=mcwt_ext" in what[f"sanitizer-{tool}"]
        assert ("PYTORCH_NO_CUDA_MEMORY_CACHING=1" in what[f"sanitizer-{tool}"]) == (tool == "memcheck")
    for bench in sorted((ROOT / "benchmarks").glob("bench_*.py")):  # every device benchmark, on the GPU
        if "--device" in bench.read_text():
            assert any(bench.name in w and "--device cuda" in w for w in what.values()), bench
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # a dry run writes nothing
    too_small = _script(CHECK, "--dry-run", BUDGET_S=300)
    assert too_small.returncode == 2 and "BUDGET_S 300" in too_small.stderr


def test_the_cuda_selection_holds_every_cuda_test(tmp_path):
    """`-m needs_cuda` (gpu_check's selection) collects every [cuda] variant, the needs_cuda tests
    and the GPU paths' tests: one collection on this CPU, listing each test and its marks."""
    plugin = tmp_path / "list_marks.py"
    plugin.write_text("def pytest_collection_finish(session):\n"
                      "    for item in session.items:\n"
                      "        print('ITEM', item.nodeid, 'needs_cuda' in item.keywords)\n")
    env = child_env(PYTHONPATH=f"{IMPORT_ROOT}{os.pathsep}{tmp_path}")
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "list_marks",
                          "-p", "no:cacheprovider", str(ROOT / "python_tests")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path).stdout
    items = dict(line[len("ITEM "):].rsplit(" ", 1) for line in out.splitlines() if line.startswith("ITEM "))
    selected = {nodeid for nodeid, marked in items.items() if marked == "True"}
    cuda_variants = {n for n in items if "[" in n and "cuda" in n.split("[", 1)[1].rstrip("]").replace("-", " ").split()}
    assert len(cuda_variants) > 100 and cuda_variants <= selected
    assert {n for n in items if "test_gpu_paths.py" in n} <= selected
    assert len(selected) < len(items) / 2  # the CUDA tests only: the CPU suite is CI's


def test_gpu_table1_plan_adds_up_and_plans_a_reproduce_the_cli_accepts(tmp_path, monkeypatch):
    from mcwt_ext.cli import build_parser

    assert subprocess.run(["bash", "-n", str(TABLE1)]).returncode == 0
    # BUILD=auto rebuilds unless the importable mcwt_ext is this checkout's build with CUDA kernels:
    # a CPU-only build (the README's install on a machine without a GPU) plans the build
    has_cuda_build = subprocess.run([sys.executable, str(ROOT / "mcwt_ext" / "_source.py"), "--check", str(ROOT),
                                     "--cuda"], cwd="/", capture_output=True, env=child_env()).returncode == 0
    for budget, build in ((540, "force"), (540, "auto"), (240, "auto")):
        need_build = build == "force" or not has_cuda_build
        result = _script(TABLE1, "--dry-run", str(tmp_path / "previous.zip"), OUT=tmp_path / "out",
                         WORK=tmp_path / "work", BUDGET_S=budget, BUILD=build)
        if need_build and budget == 240:  # a build (150 s) leaves the grid too little of 240 s
            assert result.returncode == 2 and "too little" in result.stderr, result.stderr
            continue
        assert result.returncode == 0, result.stderr
        steps, total = _plan(result.stdout)
        _adds_up(steps, budget)
        assert total == (budget, budget)
        what = {name: (limit, w) for name, limit, _, w in steps}
        data = [] if need_build else ["data"]  # beside the build, or on its own
        assert [s[0] for s in steps if s[2] is None] == ["inputs", "env", "build", *data, "import", "grid",
                                                          "export", "pack"]
        assert ("--no-build-isolation --no-deps --no-index" in what["build"][1]) == need_build
        assert (what["build"][0] == 150) == need_build
        assert ("data", 30, "build" if need_build else None) in [s[:3] for s in steps]
        command = what["grid"][1].split("KILL 30 s later) ", 1)[1]
        argv = shlex.split(command)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the plan is for a CUDA machine
        args = build_parser().parse_args(argv[argv.index("mcwt_ext.cli") + 1:])
        assert (args.command, args.dataset, args.protocol, args.device, args.pack, args.seeds) == \
            ("reproduce", "cifar10", "full", "cuda", "auto", 3)
        assert args.arch == ["conv2", "conv4", "conv6"]
        assert args.time_budget == what["grid"][0] - 30 - 30  # less the export grace and the stop margin
        assert args.import_state == tmp_path / "previous.zip"
        assert args.export_state == tmp_path / "out" / "state.zip"
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # a dry run writes nothing


def test_gpu_table1_help_says_how_the_data_travels():
    result = subprocess.run(["bash", str(TABLE1), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for words in ("cp /work/shared/data/cifar10/cifar10-jpeg.npz /work/shared/data/cifar10/materialize.py "
                  ".device_data/", "carry [\".device_data\"]", "symbolic link", "53 MiB", "Which to run when",
                  "BUDGET_S=240 bash scripts/gpu_table1.sh"):
        assert words in result.stdout, words
    assert ".device_data/" in (ROOT / ".gitignore").read_text()  # the carried folder is ignored
    assert "BUDGET_S=240 bash scripts/gpu_table1.sh" in CHECK.read_text()  # both say which to run when


@pytest.mark.parametrize("case", ["missing", "symlink", "budget"])
def test_gpu_table1_checks_its_inputs_before_anything_else(tmp_path, case):
    data = tmp_path / "data"
    env = dict(OUT=tmp_path / "out", WORK=tmp_path / "work", DATA_DIR=data, DATASET="cifar10")
    if case == "symlink":
        real = tmp_path / "real"
        real.mkdir()
        for f in ("cifar10-jpeg.npz", "materialize.py"):
            (real / f).write_text("x")
        data.symlink_to(real)
    if case == "budget":  # a build must fit: 240 s cannot hold it
        data.mkdir()
        for f in ("cifar10-jpeg.npz", "materialize.py"):
            (data / f).write_text("x")
        env.update(BUDGET_S=240, BUILD="force")
    began = time.time()
    result = _script(TABLE1, **env)
    assert result.returncode == 2 and time.time() - began < 30
    message = {"missing": "cifar10-jpeg.npz is missing", "symlink": "is a symbolic link",
               "budget": "BUDGET_S 240 leaves the grid"}[case]
    assert message in result.stderr
    rows = _summary(tmp_path / "out" / "gpu_table1-summary.md")
    assert rows["inputs"][0] == 2 and "build" not in rows and "env" not in rows
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_table1-logs.tar.gz", "gpu_table1-summary.md"]


def test_source_check_tells_a_matching_build_from_a_stale_one(tmp_path):
    source = [sys.executable, str(ROOT / "mcwt_ext" / "_source.py")]
    ok = subprocess.run([*source, "--check", str(ROOT)], capture_output=True, text=True, env=child_env(),
                        cwd=tmp_path, timeout=60)
    assert ok.returncode == 0 and "matches this checkout" in ok.stdout, ok.stdout + ok.stderr
    other = tmp_path / "checkout"
    shutil.copytree(ROOT / "csrc", other / "csrc")
    shutil.copytree(ROOT / "mcwt_ext", other / "mcwt_ext", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, other / name)
    (other / "csrc" / "mcwt.cpp").write_text((other / "csrc" / "mcwt.cpp").read_text() + "\n// changed\n")
    stale = subprocess.run([*source, "--check", str(other)], capture_output=True, text=True, env=child_env(),
                           cwd=tmp_path, timeout=60)
    assert stale.returncode == 1 and "other sources" in stale.stdout


def test_a_limit_stops_background_pytest_with_sigint_and_its_summary(tmp_path):
    """bash starts background commands with SIGINT ignored (no job control); sigint_module.py
    restores KeyboardInterrupt, so a step's SIGINT ends pytest with its summary line."""
    (tmp_path / "test_sleep.py").write_text("import time\n\ndef test_sleeps():\n    time.sleep(60)\n")
    wrapper = ROOT / "scripts" / "sigint_module.py"
    # 10 s: pytest must be inside the test when the signal comes (on a loaded 2-core machine its
    # start alone took over 4 s, and a SIGINT during collection prints no summary)
    command = (f"timeout --signal=INT --kill-after=20 10 {sys.executable} {wrapper} pytest -p no:cacheprovider "
               f"test_sleep.py & wait $!")
    began = time.time()
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env=child_env())
    assert result.returncode == 124 and time.time() - began < 25
    assert "KeyboardInterrupt" in result.stdout and "no tests ran" in result.stdout


@pytest.mark.slow
def test_cpu_rehearsal_of_a_lease_stops_half_way_and_a_second_call_finishes(tmp_path):
    """gpu_check and gpu_table1 rehearsed on this CPU in one output folder (as one call), the grid
    stopped by SIGTERM half way; then a second call on a fresh machine (WORK) imports the first
    call's bundle and finishes the grid without redoing a finished cell."""
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    check = _script(CHECK, "--rehearse", OUT=out1, WORK=tmp_path / "w0", timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    first = _script(TABLE1, "--rehearse", OUT=out1, WORK=tmp_path / "w1", STOP_AFTER_CELLS=3, timeout=150)
    assert first.returncode == 0, first.stdout + first.stderr
    grid1 = tmp_path / "w1" / "grid"
    done1 = {p.relative_to(grid1): p.read_text() for p in grid1.glob("*/seed_*/*/summary.json")}
    assert 3 <= len(done1) < 5  # half way through the 5 cells: imp, fit, random, 2 MCWT (1 seed)
    second = _script(TABLE1, "--rehearse", str(out1 / "state.zip"), OUT=out2, WORK=tmp_path / "w2", timeout=150)
    assert second.returncode == 0, second.stdout + second.stderr
    grid2 = tmp_path / "w2" / "grid"
    assert len(list(grid2.glob("*/seed_*/*/summary.json"))) == 5
    for rel, text in done1.items():  # imported, not redone
        assert (grid2 / rel).read_text() == text, rel
    assert "imported" in (tmp_path / "w2" / "logs" / "grid.log").read_text()

    assert sorted(p.name for p in out1.iterdir()) == ["gpu_check-logs.tar.gz", "gpu_check-summary.md",
                                                      "gpu_table1-logs.tar.gz", "gpu_table1-summary.md",
                                                      "state.zip"]
    assert sorted(p.name for p in out2.iterdir()) == ["gpu_table1-logs.tar.gz", "gpu_table1-summary.md",
                                                      "state.zip", "table.md"]
    for out in (out1, out2):
        assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())
    plans = {CHECK: _plan(_script(CHECK, "--dry-run").stdout)[0],
             TABLE1: _plan(_script(TABLE1, "--dry-run", OUT=out1, WORK=tmp_path / "w9").stdout)[0]}
    for summary, script, steps in ((out1 / "gpu_check-summary.md", CHECK, plans[CHECK]),
                                   (out1 / "gpu_table1-summary.md", TABLE1, None),
                                   (out2 / "gpu_table1-summary.md", TABLE1, None)):
        rows = _summary(summary)
        budget = rows.pop("total")
        assert budget[0] == 0 and budget[1] <= budget[2]  # exit 0, within the budget
        if steps is not None:
            assert set(rows) == {name for name, *_ in steps}  # every step, with its exit code and seconds
        else:
            assert set(rows) == {"inputs", "env", "build", "import", "grid", "export", "pack"}
        for name, (code, seconds, limit, status) in rows.items():
            assert seconds <= limit or status.startswith("skipped"), (summary, name)
            assert code == 0 or status.startswith("stopped"), (summary, name, status)
    assert _summary(out1 / "gpu_table1-summary.md")["grid"][3] == "stopped: SIGTERM after 3 cells (rehearsal)"
    assert _summary(out2 / "gpu_table1-summary.md")["grid"][3] == "ok"
    with tarfile.open(out2 / "gpu_table1-logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/grid.log" in names and "logs/results/table.csv" in names and "logs/results/finished_cells.txt" in names
    manifest = json.loads(__import__("zipfile").ZipFile(out2 / "state.zip").read("manifest.json"))
    assert len(manifest["masks"]) >= 5
