"""Bad input on every command: one line on stderr naming the flag or the file, exit status 2,
nothing written; and a command that fails late leaves nothing that blocks the corrected retry.

Runs in-process (``cli.main``) on the synthetic dataset; nothing trains for more than a few
iterations.
"""
import hashlib
import json
import pickle
import shutil
import urllib.error
from pathlib import Path

import pytest
from safetensors.torch import save_file

from mcwt_ext import commands
from mcwt_ext.cli import main
from mcwt_ext.data import CIFAR_DIR, CIFAR_TEST_BATCH, CIFAR_TRAIN_BATCHES
from mcwt_ext.errors import UsageError
from mcwt_ext.masks import dense_masks
from mcwt_ext.models import build_model
from mcwt_ext.runs import RunDir

MODEL = ["--arch", "conv2", "--dataset", "synthetic"]
TRAIN = [*MODEL, "--iterations", "2", "--eval-every", "1", "--quiet"]
SMALL_IMP = ["--sparsity", "0.5", "--rates", "conv=0.5,linear=0.5,output=0.5"]
SPARSITY_OWNERS = "(--sparsity is a flag of: mcwt imp, mcwt random, mcwt prune, mcwt dst, mcwt sample)"


def _tree(*roots: Path) -> dict:
    """Every file under ``roots`` with a digest of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A finished ticket, its fit, a sample, and every kind of broken file, under one root."""
    root = tmp_path_factory.mktemp("fuzz")
    f = {"root": root}
    f["ticket"] = root / "ticket"
    assert main(["imp", *TRAIN, *SMALL_IMP, "--out", str(f["ticket"])]) == 0
    f["fit"] = root / "fit.json"
    assert main(["fit", "--ticket", str(f["ticket"]), "--max-samples", "64", "--quiet",
                 "--out", str(f["fit"])]) == 0
    f["sample"] = root / "sample"
    assert main(["sample", *MODEL, "--fit", str(f["fit"]), "--max-samples", "64", "--quiet",
                 "--out", str(f["sample"])]) == 0
    masks, init = f["ticket"] / RunDir.MASKS, f["ticket"] / RunDir.INIT

    def write(name, data):
        path = root / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return path

    f["text"] = write("notes.txt", "hello\n")
    f["empty"] = write("empty.safetensors", b"")
    f["truncated"] = write("truncated.safetensors", masks.read_bytes()[: masks.stat().st_size // 2])
    f["truncated_init"] = write("truncated_init.safetensors", init.read_bytes()[:100])
    f["dir"] = root / "a_dir"
    f["dir"].mkdir()
    conv4 = build_model("conv4", 3, 10, 8)
    save_file({k: v.contiguous() for k, v in conv4.state_dict().items()}, str(root / "conv4_init.safetensors"))
    save_file(dense_masks(conv4), str(root / "conv4_masks.safetensors"))
    f["conv4_init"], f["conv4_masks"] = root / "conv4_init.safetensors", root / "conv4_masks.safetensors"
    f["conv4_run"] = root / "conv4_run"
    f["conv4_run"].mkdir()
    shutil.copy(f["conv4_masks"], f["conv4_run"] / RunDir.MASKS)

    fit = json.loads(f["fit"].read_text())
    f["fit_list"] = write("fit_list.json", "[1, 2]")
    f["fit_no_models"] = write("fit_no_models.json", json.dumps({"format": fit["format"]}))
    f["fit_wrong_tag"] = write("fit_wrong_tag.json", json.dumps(dict(fit, format="other/1")))
    f["fit_truncated"] = write("fit_truncated.json", f["fit"].read_text()[:40])
    strings = json.loads(json.dumps(fit))
    for variants in strings["models"].values():
        for m in variants.values():
            m["bias"] = "high"
    f["fit_strings"] = write("fit_strings.json", json.dumps(strings))
    magnitude_only = json.loads(json.dumps(fit))
    for variants in magnitude_only["models"].values():
        variants.pop("connectivity", None)
    f["fit_magnitude_only"] = write("fit_magnitude_only.json", json.dumps(magnitude_only))

    def ticket_copy(name, drop=(), config=None):
        path = root / name
        shutil.copytree(f["ticket"], path)
        for d in drop:
            (path / d).unlink()
        if config is not None:
            (path / RunDir.CONFIG).write_text(config)
        return path

    f["ticket_no_masks"] = ticket_copy("ticket_no_masks", drop=[RunDir.MASKS])
    f["ticket_no_config"] = ticket_copy("ticket_no_config", drop=[RunDir.CONFIG])
    f["ticket_list_config"] = ticket_copy("ticket_list_config", config="[]")
    cfg = json.loads((f["ticket"] / RunDir.CONFIG).read_text())
    f["ticket_no_dataset"] = ticket_copy("ticket_no_dataset", config=json.dumps(
        {k: v for k, v in cfg.items() if k != "dataset"}))
    f["ticket_bad_init"] = ticket_copy("ticket_bad_init")
    shutil.copy(f["truncated_init"], f["ticket_bad_init"] / RunDir.INIT)
    f["run_no_masks"] = root / "run_no_masks"
    f["run_no_masks"].mkdir()
    (f["run_no_masks"] / RunDir.CONFIG).write_text("{}")

    f["foreign"] = root / "foreign"  # a folder of other files: not a run directory
    f["foreign"].mkdir()
    (f["foreign"] / "thesis.tex").write_text("\\begin{document}")
    f["other_run"] = root / "other_run"  # a run of other settings
    assert main(["random", *TRAIN, "--no-train", "--out", str(f["other_run"])]) == 0

    f["cifar_missing"] = root / "cifar_missing"
    (f["cifar_missing"] / CIFAR_DIR).mkdir(parents=True)
    f["cifar_corrupt"] = root / "cifar_corrupt"
    (f["cifar_corrupt"] / CIFAR_DIR).mkdir(parents=True)
    for n in CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH,):
        (f["cifar_corrupt"] / CIFAR_DIR / n).write_bytes(pickle.dumps({b"data": [1, 2]})[:20])
    f["cifar_wrong_keys"] = root / "cifar_wrong_keys"
    (f["cifar_wrong_keys"] / CIFAR_DIR).mkdir(parents=True)
    for n in CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH,):
        (f["cifar_wrong_keys"] / CIFAR_DIR / n).write_bytes(pickle.dumps({b"pixels": b"x"}))
    return f


# (argv with {placeholders}: fixture paths, {out}: the case's output path; what stderr names)
CASES = {
    "train": [
        (["train", "--dataset", "synthetic", "--out", "{out}"], "--arch"),
        (["train", "--arch", "conv2", "--out", "{out}"], "--dataset"),
        (["train", *TRAIN], "--out"),
        (["train", *TRAIN, "--iterations", "abc", "--out", "{out}"], "--iterations"),
        (["train", *TRAIN, "--iterations", "0", "--out", "{out}"], "--iterations"),
        (["train", *TRAIN, "--lr", "0", "--out", "{out}"], "--lr"),
        (["train", *TRAIN, "--lr", "nan", "--out", "{out}"], "--lr"),
        (["train", *TRAIN, "--batch-size", "-3", "--out", "{out}"], "--batch-size"),
        (["train", *TRAIN, "--batch-size", "100000", "--out", "{out}"], "--batch-size"),
        (["train", *TRAIN, "--eval-every", "x", "--out", "{out}"], "--eval-every"),
        (["train", *TRAIN, "--checkpoint-every", "-1", "--out", "{out}"], "--checkpoint-every"),
        (["train", *TRAIN, "--seed", "-1", "--out", "{out}"], "--seed"),
        (["train", *TRAIN, "--split-seed", "1.5", "--out", "{out}"], "--split-seed"),
        (["train", *TRAIN, "--val-size", "0", "--out", "{out}"], "--val-size"),
        (["train", *TRAIN, "--val-size", "100000", "--out", "{out}"], "val_size"),
        (["train", *TRAIN, "--device", "tpu", "--out", "{out}"], "--device"),
        (["train", *TRAIN, "--masks", "{root}/absent.safetensors", "--out", "{out}"], "--masks"),
        (["train", *TRAIN, "--masks", "{text}", "--out", "{out}"], "--masks"),
        (["train", *TRAIN, "--masks", "{empty}", "--out", "{out}"], "--masks"),
        (["train", *TRAIN, "--masks", "{truncated}", "--out", "{out}"], "--masks"),
        (["train", *TRAIN, "--masks", "{dir}", "--out", "{out}"], "--masks"),
        (["train", *TRAIN, "--masks", "{conv4_masks}", "--out", "{out}"], "of a conv4"),
        (["train", *TRAIN, "--masks", "{conv4_init}", "--out", "{out}"], "--masks"),
        (["train", *TRAIN, "--init", "{text}", "--out", "{out}"], "--init"),
        (["train", *TRAIN, "--init", "{conv4_init}", "--out", "{out}"], "of a conv4"),
        (["train", *TRAIN, "--init", "{conv4_masks}", "--out", "{out}"], "--init"),
        (["train", *TRAIN, "--checkpoint-minutes", "-1", "--out", "{out}"], "--checkpoint-minutes"),
        (["train", *TRAIN, "--checkpoint-minutes", "soon", "--out", "{out}"], "--checkpoint-minutes"),
        (["train", *TRAIN, "--augment", "rotate", "--out", "{out}"], "--augment"),
        (["train", *TRAIN, "--precision", "fp16", "--out", "{out}"], "--precision"),
        (["train", *TRAIN, "--out", "{text}"], "--out"),
        (["train", *TRAIN, "--out", "{foreign}"], "--out"),
        (["train", *TRAIN, "--out", "{text}/run"], "--out"),
        (["train", *TRAIN, "--out", "{other_run}"], "config.json"),
        (["train", *TRAIN, "--out", "/proc/mcwt_run"], "(cannot create the run directory in /proc)"),
        (["train", *TRAIN, "--sparsity", "0.5", "--out", "{out}"], SPARSITY_OWNERS),
        (["train", *TRAIN, "--no-train", "--out", "{out}"], "(--no-train is a flag of: mcwt random, mcwt prune)"),
        (["train", "--arch", "conv2", "--dataset", "cifar10", "--out", "{out}"], "--data-root"),
        (["train", "--arch", "conv2", "--dataset", "cifar10", "--data-root", "{cifar_missing}",
          "--out", "{out}"], "cifar-10-batches-py"),
        (["train", "--arch", "conv2", "--dataset", "cifar10", "--data-root", "{cifar_corrupt}",
          "--out", "{out}"], "data_batch_1"),
        (["train", "--arch", "conv2", "--dataset", "cifar10", "--data-root", "{cifar_wrong_keys}",
          "--out", "{out}"], "data_batch_1"),
        (["train", "--arch", "conv2", "--dataset", "cifar10", "--data-root", "{text}",
          "--out", "{out}"], "cifar-10-batches-py"),
    ],
    "imp": [
        (["imp", *TRAIN, "--sparsity", "1", "--out", "{out}"], "--sparsity"),
        (["imp", *TRAIN, "--sparsity", "-0.1", "--out", "{out}"], "--sparsity"),
        (["imp", *TRAIN, "--sparsity", "most", "--out", "{out}"], "--sparsity"),
        (["imp", *TRAIN, "--rates", "conv=2", "--out", "{out}"], "--rates"),
        (["imp", *TRAIN, "--rates", "conv", "--out", "{out}"], "--rates"),
        (["imp", *TRAIN, "--rates", "conv=0,linear=0,output=0", "--out", "{out}"], "--rates"),
        (["imp", *TRAIN, "--rewind-iteration", "-1", "--out", "{out}"], "--rewind-iteration"),
        (["imp", *TRAIN, "--allocation", "diagonal", "--out", "{out}"], "--allocation"),
        (["imp", *TRAIN, "--rewind-iteration", "5", "--out", "{out}"], "rewind_iteration"),
        (["imp", *TRAIN, "--max-rounds", "x", "--out", "{out}"], "--max-rounds"),
        (["imp", *TRAIN, "--batch-size", "100000", *SMALL_IMP, "--out", "{out}"], "--batch-size"),
        (["imp", *TRAIN, "--out", "{text}"], "--out"),
        (["imp", *TRAIN, "--out", "/proc/mcwt_run"], "(cannot create the run directory in /proc)"),
        (["imp", *TRAIN, "--rates", "conv=0.2", "--allocation", "global", "--out", "{out}"],
         "--rates: allocation global prunes the pooled layers at one rate"),
    ],
    "random": [
        (["random", *TRAIN, "--sparsity", "1.5", "--out", "{out}"], "--sparsity"),
        (["random", *TRAIN, "--precision", "half", "--out", "{out}"], "--precision"),
        (["random", *TRAIN, "--like", "{root}/absent.safetensors", "--out", "{out}"], "--like"),
        (["random", *TRAIN, "--like", "{conv4_masks}", "--out", "{out}"], "of a conv4"),
        (["random", *TRAIN, "--like", "{text}", "--out", "{out}"], "--like"),
        (["random", *TRAIN, "--mask-seed", "-2", "--out", "{out}"], "--mask-seed"),
        (["random", *TRAIN, "--init", "{dir}", "--out", "{out}"], "--init"),
        (["random", *TRAIN, "--init", "{truncated_init}", "--out", "{out}"], "--init"),
        (["random", *TRAIN, "--sparsity", "0.5", "--like", "{ticket}/masks.safetensors",
          "--out", "{out}"], "--like"),
        (["random", *TRAIN, "--batch-size", "100000", "--out", "{out}"], "--batch-size"),
        (["random", *TRAIN, "--out", "{foreign}"], "--out"),
        (["random", *TRAIN, "--distribution", "normal", "--out", "{out}"], "--distribution"),
        (["random", *TRAIN, "--distribution", "erk", "--like", "{ticket}/masks.safetensors",
          "--out", "{out}"], "--distribution"),
    ],
    "prune": [
        (["prune", *TRAIN, "--method", "magnitude", "--distribution", "ERK", "--out", "{out}"],
         "--distribution"),
        (["prune", *TRAIN, "--method", "magnitude", "--distribution", "erk", "--allocation", "global",
          "--out", "{out}"], "--distribution"),
    ],
    "dst": [
        (["dst", *TRAIN, "--out", "{out}"], "--method"),
        (["dst", *TRAIN, "--method", "snip", "--out", "{out}"], "--method"),
        (["dst", *TRAIN, "--method", "rigl", "--update-every", "0", "--out", "{out}"], "--update-every"),
        (["dst", *TRAIN, "--method", "rigl", "--stop-at", "0", "--out", "{out}"], "--stop-at"),
        (["dst", *TRAIN, "--method", "rigl", "--stop-at", "1.5", "--out", "{out}"], "--stop-at"),
        (["dst", *TRAIN, "--method", "set", "--alpha", "nan", "--out", "{out}"], "--alpha"),
        (["dst", *TRAIN, "--method", "set", "--alpha", "-0.3", "--out", "{out}"], "--alpha"),
        (["dst", *TRAIN, "--method", "rigl", "--sparsity", "1", "--out", "{out}"], "--sparsity"),
        (["dst", *TRAIN, "--method", "rigl", "--start", "{root}/absent.safetensors", "--out", "{out}"],
         "--start"),
        (["dst", *TRAIN, "--method", "rigl", "--start", "{conv4_masks}", "--out", "{out}"], "of a conv4"),
        (["dst", *TRAIN, "--method", "rigl", "--start", "{text}", "--out", "{out}"], "--start"),
        (["dst", *TRAIN, "--method", "rigl", "--sparsity", "0.5", "--start", "{sample}/masks.safetensors",
          "--out", "{out}"], "--start"),
        (["dst", *TRAIN, "--method", "set", "--mask-seed", "-1", "--out", "{out}"], "--mask-seed"),
        (["dst", *TRAIN, "--method", "set", "--distribution", "normal", "--out", "{out}"], "--distribution"),
        (["dst", *TRAIN, "--method", "set", "--distribution", "erk", "--start", "{sample}/masks.safetensors",
          "--out", "{out}"], "--distribution"),
        (["dst", *TRAIN, "--method", "rigl", "--out", "{foreign}"], "--out"),
    ],
    "fit": [
        (["fit", "--out", "{out}"], "--ticket"),
        (["fit", "--ticket", "{root}/absent", "--out", "{out}"], "--ticket"),
        (["fit", "--ticket", "{text}", "--out", "{out}"], "--ticket"),
        (["fit", "--ticket", "{ticket_no_config}", "--out", "{out}"], "--ticket"),
        (["fit", "--ticket", "{ticket_no_masks}", "--out", "{out}"], "--ticket"),
        (["fit", "--ticket", "{ticket_list_config}", "--out", "{out}"], "--ticket"),
        (["fit", "--ticket", "{ticket_no_dataset}", "--out", "{out}"], "--ticket"),
        (["fit", "--ticket", "{ticket_bad_init}", "--out", "{out}"], "--ticket"),
        (["fit", "--ticket", "{ticket}", "--max-samples", "0", "--out", "{out}"], "--max-samples"),
        (["fit", "--ticket", "{ticket}", "--max-weights", "x", "--out", "{out}"], "--max-weights"),
        (["fit", "--ticket", "{ticket}", "--out", "{dir}"], "--out"),
        (["fit", "--ticket", "{ticket}", "--out", "{text}/fit.json"], "--out"),
        (["fit", "--ticket", "{ticket}", "--out", "/proc/mcwt_fit.json"], "(cannot create the file in /proc)"),
        (["fit", "--ticket", "{ticket}", "--arch", "conv2", "--out", "{out}"],
         "(--arch is a flag of: mcwt train, mcwt imp, mcwt random, mcwt prune, mcwt dst, mcwt sample, "
         "mcwt reproduce)"),
    ],
    "sample": [
        (["sample", *MODEL, "--out", "{out}"], "--fit"),
        (["sample", *MODEL, "--fit", "{root}/absent.json", "--out", "{out}"], "--fit"),
        (["sample", *MODEL, "--fit", "{text}", "--out", "{out}"], "notes.txt"),
        (["sample", *MODEL, "--fit", "{fit_list}", "--out", "{out}"], "--fit"),
        (["sample", *MODEL, "--fit", "{fit_no_models}", "--out", "{out}"], "--fit"),
        (["sample", *MODEL, "--fit", "{fit_wrong_tag}", "--out", "{out}"], "--fit"),
        (["sample", *MODEL, "--fit", "{fit_truncated}", "--out", "{out}"], "fit_truncated.json"),
        (["sample", *MODEL, "--fit", "{fit_strings}", "--out", "{out}"], "--fit"),
        (["sample", *MODEL, "--fit", "{fit_magnitude_only}", "--out", "{out}"], "--fit"),
        (["sample", *MODEL, "--fit", "{empty}", "--out", "{out}"], "--fit"),
        (["sample", *MODEL, "--fit", "{dir}", "--out", "{out}"], "--fit"),
        (["sample", *MODEL, "--fit", "{fit}", "--sparsity", "1", "--out", "{out}"], "--sparsity"),
        (["sample", *MODEL, "--fit", "{fit}", "--device", "cuda:7", "--out", "{out}"], "--device"),
        (["sample", *MODEL, "--fit", "{fit}", "--init", "{conv4_init}", "--out", "{out}"], "of a conv4"),
        (["sample", *MODEL, "--fit", "{fit}", "--max-samples", "-1", "--out", "{out}"], "--max-samples"),
        (["sample", *MODEL, "--fit", "{fit}", "--out", "{text}"], "--out"),
        (["sample", *MODEL, "--fit", "{fit}", "--out", "/proc/mcwt_run"], "(cannot create the run directory in /proc)"),
        (["sample", *MODEL, "--fit", "{fit}", "--distribution", "", "--out", "{out}"], "--distribution"),
    ],
    "plot": [
        (["plot", "--ticket", "{ticket}", "--out", "{out}"], "--mcwt"),
        (["plot", "--ticket", "{ticket}", "--mcwt", "{root}/absent", "--out", "{out}"], "--mcwt"),
        (["plot", "--ticket", "{ticket}", "--mcwt", "{text}", "--out", "{out}"], "--mcwt"),
        (["plot", "--ticket", "{ticket}", "--mcwt", "{run_no_masks}", "--out", "{out}"], "--mcwt"),
        (["plot", "--ticket", "{ticket}", "--mcwt", "{sample}", "--random", "{conv4_run}",
          "--out", "{out}"], "--random"),
        (["plot", "--ticket", "{ticket_no_masks}", "--mcwt", "{sample}", "--out", "{out}"], "--ticket"),
        (["plot", "--ticket", "{ticket}", "--mcwt", "{sample}", "--max-samples", "0",
          "--out", "{out}"], "--max-samples"),
        (["plot", "--ticket", "{ticket}", "--mcwt", "{sample}", "--out", "{text}"], "--out"),
        (["plot", "--ticket", "{ticket}", "--mcwt", "{sample}", "--out", "{text}/figs"], "--out"),
        (["plot", "--ticket", "{ticket}", "--mcwt", "{sample}", "--out", "/proc/mcwt_figs"],
         "(cannot create the folder in /proc)"),
    ],
    "reproduce": [
        (["reproduce", "--arch", "conv9", "--out", "{out}"], "--arch"),
        (["reproduce", "--seeds", "0", "--out", "{out}"], "--seeds"),
        (["reproduce", "--time-budget", "0", "--out", "{out}"], "--time-budget"),
        # (--time-budget with --pack 1 is fine now: a cell-by-cell grid stops at the deadline)
        (["reproduce", "--export-every-minutes", "5", "--out", "{out}"], "--export-state"),
        (["reproduce", "--augment", "rotate", "--out", "{out}"], "--augment"),
        (["reproduce", "--jobs", "0", "--out", "{out}"], "--jobs"),
        (["reproduce", "--protocol", "fast", "--out", "{out}"], "--protocol"),
        (["reproduce", "--eval-every", "0", "--out", "{out}"], "--eval-every"),
        (["reproduce", "--device", "tpu", "--out", "{out}"], "--device"),
        (["reproduce", "--dataset", "cifar10", "--out", "{out}"], "--data-root"),
        (["reproduce", "--dataset", "cifar10", "--data-root", "{cifar_corrupt}", "--out", "{out}"],
         "data_batch_1"),
        (["reproduce", "--dataset", "cifar10", "--data-root", "{cifar_missing}", "--download",
          "--out", "{out}"], "--download"),
        (["reproduce", "--out", "{text}"], "--out"),
        (["reproduce", "--out", "{foreign}"], "--out"),
        (["reproduce", "--dataset", "synthetic", "--out", "/proc/mcwt_grid"],
         "(cannot create the grid directory in /proc)"),
        (["reproduce", "--sparsity", "0.5", "--out", "{out}"],
         "unrecognized arguments: --sparsity 0.5 " + SPARSITY_OWNERS),
        (["reproduce", "--executor", "dask", "--out", "{out}"], "--executor"),
        (["reproduce", "--executor", "ray", "--ray-address", "10.0.0.1", "--out", "{out}"], "--ray-address"),
        (["reproduce", "--ray-address", "10.0.0.1:6379", "--out", "{out}"], "--ray-address"),  # not on Ray
        (["reproduce", "--executor", "ray", "--shard", "1/2", "--out", "{out}"], "--shard"),
        (["reproduce", "--executor", "ray", "--jobs", "2", "--out", "{out}"], "--jobs"),
        (["reproduce", "--executor", "ray", "--pack", "4", "--time-budget", "60", "--out", "{out}"],
         "--time-budget"),
        (["reproduce", "--shard", "1/2", "--lock-timeout", "0", "--out", "{out}"], "--lock-timeout"),
    ],
}
ALL = [(cmd, argv, match) for cmd, cases in CASES.items() for argv, match in cases]


def test_the_table_is_large_enough():
    assert len(ALL) >= 60 and set(CASES) == {"train", "imp", "random", "prune", "dst", "fit", "sample",
                                            "plot", "reproduce"}


@pytest.fixture
def offline(monkeypatch):
    """torchvision's download fails as it does without network."""
    import torchvision.datasets

    class NoNetwork:
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoNetwork)


@pytest.mark.parametrize("command,argv,match", ALL, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(ALL)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(inputs, offline, tmp_path, monkeypatch, capsys,
                                                          command, argv, match):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [a.format(out=out, **inputs) for a in argv]
    before = _tree(inputs["root"], tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    print(err, end="")  # pytest -rA shows every message
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"mcwt {command}: error: "), err
    assert match in err, err
    assert not out.exists() and _tree(inputs["root"], tmp_path) == before


def test_a_corrupt_checkpoint_is_one_line_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *TRAIN, "--iterations", "4", "--checkpoint-every", "2", "--out", str(out)]
    assert main(argv) == 0
    for name in (RunDir.SUMMARY, RunDir.FINAL):
        (out / name).unlink()
    (out / RunDir.CHECKPOINTS).mkdir()
    (out / RunDir.CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")
    before = _tree(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "last.pt" in err, err
    assert _tree(out) == before


def test_unexpected_errors_are_bugs_with_their_traceback(tmp_path, monkeypatch, capsys):
    """Bugs are not dressed up as bad input: exit status 1, the traceback kept in a file."""
    import tempfile

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(commands, "train", bug)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["train", *TRAIN, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "internal error (a bug in mcwt" in err and "KeyError: 'a bug'" in err
    [report] = tmp_path.glob("mcwt-train-*.traceback.txt")
    assert "Traceback (most recent call last)" in report.read_text()


# --- a failed first run, then the corrected retry ------------------------------------------------

def _fail_then(capsys, bad: list[str], good: list[str], out: Path, match: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(bad)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and match in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    assert main(good) == 0


def _fails_late(monkeypatch, module, name: str, out: Path) -> None:
    """``module.name`` raises bad-input news once the run directory is open."""
    def late_failure(*args, **kwargs):
        assert (out / RunDir.CONFIG).is_file()  # it is late: the run directory is open
        raise UsageError("late: the input turned out bad")

    monkeypatch.setattr(module, name, late_failure)


@pytest.mark.parametrize("command,module,name", [
    ("train", commands, "train"),            # after the init and masks were saved
    ("random", commands, "train"),
    ("imp", "mcwt_ext.imp", "train"),        # in round 0, after imp.json and round_00/masks
])
def test_retry_after_a_late_training_failure(tmp_path, capsys, monkeypatch, command, module, name):
    import importlib

    out = tmp_path / "run"
    module = importlib.import_module(module) if isinstance(module, str) else module
    real = getattr(module, name)
    _fails_late(monkeypatch, module, name, out)
    extra = SMALL_IMP if command == "imp" else []
    with pytest.raises(SystemExit):
        main([command, *TRAIN, *extra, "--seed", "1", "--out", str(out)])
    assert "late:" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(module, name, real)
    assert main([command, *TRAIN, *extra, "--seed", "2", "--out", str(out)]) == 0  # other settings


def test_train_retry_after_masks_of_another_architecture(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    _fail_then(capsys, ["train", *TRAIN, "--masks", str(inputs["conv4_masks"]), "--out", str(out)],
               ["train", *TRAIN, "--masks", str(inputs["ticket"] / RunDir.MASKS), "--out", str(out)],
               out, "conv4")


def test_sample_retry_after_a_late_failure(inputs, tmp_path, capsys, monkeypatch):
    """The sampler fails after the run directory was opened (here: made to); the retry with
    other settings is not refused as another run."""
    import mcwt_ext.sample

    out = tmp_path / "run"
    real = mcwt_ext.sample.sample_ticket

    def late_failure(*args, **kwargs):
        assert (out / RunDir.CONFIG).is_file()  # it is late: the run directory is open
        raise UsageError("--fit: layer 0 has no model")

    monkeypatch.setattr(mcwt_ext.sample, "sample_ticket", late_failure)
    base = ["sample", *MODEL, "--fit", str(inputs["fit"]), "--max-samples", "64", "--quiet", "--out", str(out)]
    with pytest.raises(SystemExit):
        main([*base, "--sparsity", "0.5"])
    assert "layer 0" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(mcwt_ext.sample, "sample_ticket", real)
    assert main([*base, "--sparsity", "0.6"]) == 0


def test_sample_retry_after_a_bad_fit(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["sample", *MODEL, "--max-samples", "64", "--quiet", "--out", str(out)]
    _fail_then(capsys, [*base, "--fit", str(inputs["text"])], [*base, "--fit", str(inputs["fit"])], out,
               "notes.txt")


def test_fit_retry_after_a_late_failure(inputs, tmp_path, capsys, monkeypatch):
    import mcwt_ext.fit

    out = tmp_path / "fit.json"
    argv = ["fit", "--ticket", str(inputs["ticket"]), "--max-samples", "64", "--out", str(out)]
    real = mcwt_ext.fit.fit_ticket
    monkeypatch.setattr(mcwt_ext.fit, "fit_ticket", lambda *a, **k: (_ for _ in ()).throw(
        UsageError("max_weights_per_layer: too few")))
    with pytest.raises(SystemExit):
        main(argv)
    assert not out.exists() and "too few" in capsys.readouterr().err
    monkeypatch.setattr(mcwt_ext.fit, "fit_ticket", real)
    assert main(argv) == 0 and out.is_file()


def test_plot_retry_after_a_bad_sample(inputs, tmp_path, capsys):
    out = tmp_path / "figs"
    base = ["plot", "--ticket", str(inputs["ticket"]), "--max-samples", "64", "--quiet", "--out", str(out)]
    _fail_then(capsys, [*base, "--mcwt", str(inputs["run_no_masks"])], [*base, "--mcwt", str(inputs["sample"])],
               out, "--mcwt")


@pytest.mark.slow
def test_reproduce_retry_after_a_late_failure(tmp_path, capsys, monkeypatch):
    """A cell fails after the grid was opened; the retry under other settings starts afresh."""
    from mcwt_ext.experiments import grid

    out = tmp_path / "grid"
    real = grid.run_cell

    def late_failure(cell):
        assert (out / RunDir.CONFIG).is_file()
        raise UsageError("a cell's input is bad")

    monkeypatch.setattr(grid, "run_cell", late_failure)
    base = ["reproduce", "--dataset", "synthetic", "--seeds", "1", "--eval-every", "1", "--quiet",
            "--out", str(out)]
    with pytest.raises(SystemExit):
        main([*base, "--iterations", "3"])
    assert "cell's input" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(grid, "run_cell", real)
    assert main([*base, "--iterations", "2"]) == 0
    assert "Splits of synthetic: 450 training, 50 validation, 100 test images; one image is 2.00 points " \
           "of validation accuracy, 1.00 of test accuracy." in capsys.readouterr().out


# --- flags every command shares, and the defaults per dataset -------------------------------------

@pytest.mark.parametrize("command", list(CASES))
def test_every_command_takes_quiet(command):
    from mcwt_ext.cli import build_parser

    options = build_parser().commands[command]._option_string_actions
    assert options["--quiet"].dest == options["--no-progress"].dest == "no_progress"


@pytest.mark.parametrize("dataset,iterations,eval_every", [("digits", 300, 20), ("cifar10", 20000, 100)])
def test_training_defaults_come_per_dataset(dataset, iterations, eval_every):
    from mcwt_ext.cli import build_parser

    args = build_parser().parse_args(["train", "--arch", "conv2", "--dataset", dataset, "--out", "x"])
    cfg = commands.train_config(args)
    assert (cfg.iterations, cfg.eval_every) == (iterations, eval_every)
    args = build_parser().parse_args(["train", "--arch", "conv2", "--dataset", dataset, "--iterations", "7",
                                      "--out", "x"])
    assert commands.train_config(args).iterations == 7  # a flag wins
