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
