"""Figures that agree (issue 25, item 5): one colour and marker per method in every figure, read
back from the matplotlib artists; accuracy in %; axes fitted to the data; titles that name the
seed, the MCWT variant and the dataset. Tiny synthetic inputs, Agg backend: a few seconds."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mcwt_ext import plots  # noqa: E402
from mcwt_ext.experiments.methods import METHODS  # noqa: E402

ABOUT = dict(dataset="synthetic", arch="conv2", seed=3)
SHAPES = {"c1.weight": (8, 3, 3, 3), "c2.weight": (8, 8, 3, 3), "fc.weight": (10, 400)}
KINDS = {"c1.weight": "conv", "c2.weight": "conv", "fc.weight": "output"}
PAPER = ["dense", "random", "wt", "mcwt_magnitude", "mcwt_connectivity"]


@pytest.fixture
def drawn(monkeypatch):
    """``{file stem: (figure, numbers)}`` of every figure drawn in the test."""
    figs, save = {}, plots._save

    def keep(fig, numbers, out):
        figs[out.stem] = (fig, numbers)
        return save(fig, numbers, out)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def _masks(gen: torch.Generator) -> dict:
    return {name: torch.rand(shape, generator=gen) < 0.3 for name, shape in SHAPES.items()}


def _connectivity(gen: torch.Generator, tail: bool) -> dict:
    """Per input of each layer but the first; with ``tail``, one input of fc far above the rest."""
    conn = {name: 2 * torch.rand(SHAPES[name][1], generator=gen, dtype=torch.float64)
            for name in ("c2.weight", "fc.weight")}
    if tail:
        conn["fc.weight"][0] = 12.0
    return conn


def _draw_all(tmp_path) -> dict[str, str]:
    """Every figure, on made-up numbers; ``{file stem: what it shows}``."""
    gen = torch.Generator().manual_seed(0)
    init = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
    masks = {key: _masks(gen) for key in ("wt", "mcwt_connectivity", "random")}
    plots.fig1_initial_weights(init, KINDS, {k: m for k, m in masks.items() if k != "random"},
                               tmp_path / "fig1.png", **ABOUT)
    nets = {key: (m, _connectivity(gen, tail=key == "random")) for key, m in masks.items()}
    plots.fig2b_connectivity(KINDS, _connectivity(gen, tail=False), nets, tmp_path / "fig2b.png", **ABOUT)
    histories = {key: [dict(iteration=i, val_acc=0.1 + 0.08 * i + 0.01 * n) for i in range(10)]
                 for n, key in enumerate([*PAPER, "rigl", "mcwt_exact"])}
    plots.accuracy_curves(histories, tmp_path / "curves.png", **ABOUT)
    points = {METHODS[key].label: dict(method=key, cost_s=1.0 + n, cost_s_std=0.1, val_acc=50.0 + n,
                                       val_acc_std=1.0, n=3) for n, key in enumerate(METHODS)}
    plots.accuracy_vs_cost(points, tmp_path / "cost.png", **{**ABOUT, "seed": [0, 1, 2]})
    return {"fig1": "histograms", "fig2b": "histograms", "curves": "registry", "cost": "registry"}


def _styles_drawn(fig) -> dict[str, tuple[str, str]]:
    """``{legend label: (colour, marker)}`` of the labelled lines and error-bar points of ``fig``."""
    out = {}
    for ax in fig.axes:
        artists = [(line.get_label(), line) for line in ax.get_lines()]
        artists += [(c.get_label(), c.lines[0]) for c in ax.containers]  # errorbar: its data line
        for label, line in artists:
            if not label.startswith("_"):
                style = (mcolors.to_hex(line.get_color()), line.get_marker())
                assert out.setdefault(label, style) == style, (label, "two styles in one figure")
    return out


def _key_of(label: str, labels: str) -> str:
    table = plots.LEGEND if labels == "histograms" else {k: m.label for k, m in METHODS.items()}
    return next(k for k, v in table.items() if v == label)


def test_one_style_per_method_in_every_figure(tmp_path, drawn):
    which = _draw_all(tmp_path)
    seen: dict[str, dict[str, tuple[str, str]]] = {}  # method key -> figure -> style
    for stem, labels in which.items():
        styles = _styles_drawn(drawn[stem][0])
        assert len(set(styles.values())) == len(styles), (stem, "two methods look alike")
        for label, style in styles.items():
            seen.setdefault(_key_of(label, labels), {})[stem] = style
    assert set(seen["wt"]) == set(which)  # the WT is in all four
    assert {"mcwt_connectivity", "dense", "random"} <= set(seen)
    for key, per_figure in seen.items():
        colour, marker = plots.style(key)
        assert set(per_figure.values()) == {(mcolors.to_hex(colour), marker)}, (key, per_figure)
    # the JSON beside each PNG names the same style
    assert drawn["fig2b"][1]["styles"]["WT"]["color"] == plots.style("wt")[0]
    assert drawn["curves"][1][METHODS["wt"].label]["color"] == plots.style("wt")[0]
    assert drawn["cost"][1]["points"][METHODS["wt"].label]["marker"] == plots.style("wt")[1]


def test_style_table_is_fixed_for_the_paper_and_distinct():
    table = plots.style_table()
    assert list(table) == [*plots.STYLES, *(k for k in METHODS if k not in plots.STYLES)]
    assert len(set(table.values())) == len(table)
    fixed = {colour for colour, _ in plots.STYLES.values()}
    assert len(fixed) == len(plots.STYLES)
    assert not fixed & {table[k][0] for k in table if k not in plots.STYLES}
    assert plots.style("not_registered") == plots.style("not_registered")
    assert plots.style("not_registered")[0] not in fixed


def test_accuracy_is_in_percent(tmp_path, drawn):
    _draw_all(tmp_path)
    fig, numbers = drawn["curves"]
    ax = fig.axes[0]
    assert "%" in ax.get_ylabel()
    wt = numbers[METHODS["wt"].label]
    assert wt["val_acc_pct"] == pytest.approx([100 * a for a in wt["val_acc"]])
    line = next(x for x in ax.get_lines() if x.get_label() == METHODS["wt"].label)
    assert list(line.get_ydata()) == pytest.approx(wt["val_acc_pct"])
    fig, numbers = drawn["cost"]
    assert "%" in fig.axes[0].get_ylabel() and "%" in numbers["ylabel"]


def test_fig2b_axis_fits_the_data_and_says_what_it_cuts(tmp_path, drawn):
    _draw_all(tmp_path)
    fig, numbers = drawn["fig2b"]
    bins = np.asarray(numbers["bins"])
    assert bins[-1] < 3  # the bulk lies in [0, 2] / mean; one input of random's fc sits at 12
    conv, linear = fig.axes
    assert all(0 == ax.get_xlim()[0] < ax.get_xlim()[1] <= bins[-1] for ax in fig.axes)
    beyond = numbers["share_beyond_axis"]
    assert "tail cut" in linear.get_xlabel() and beyond["linear"]["random"] > 0 == beyond["linear"]["WT"]
    assert "tail cut" not in conv.get_xlabel() and set(beyond["conv"].values()) == {0}
    for per in numbers["histograms"].values():  # densities of what the axis shows
        assert all(float(np.dot(h, np.diff(bins))) == pytest.approx(1.0) for h in per.values())


def test_titles_name_the_seed_variant_and_dataset(tmp_path, drawn):
    _draw_all(tmp_path)
    titles = {stem: " ".join([fig._suptitle.get_text() if fig._suptitle else ""]
                             + [ax.get_title() for ax in fig.axes]) for stem, (fig, _) in drawn.items()}
    for stem, text in titles.items():
        assert "synthetic" in text and "conv2" in text, (stem, text)
        assert "MCWT with" in text, (stem, text)
    for stem in ("fig1", "fig2b", "curves"):
        assert "seed 3" in titles[stem]
    assert "seeds 0-2" in titles["cost"]
    assert "MCWT with connectivity" in titles["fig1"] and "without" not in titles["fig1"]
    assert "MCWT with and without connectivity" in titles["curves"]
    assert json.loads((tmp_path / "fig1.json").read_text())["title"] == drawn["fig1"][0]._suptitle.get_text()
