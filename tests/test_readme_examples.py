"""The project README's Python examples run as written.

Each test takes one fenced block from README.md verbatim, defines only the names the README
leaves to the reader (``model``, ``example``, loaders, data) with small real ones (scikit-learn's
digits), runs it in a fresh interpreter in a temporary folder and checks what it wrote.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("torch_pruning", reason="the pruning example needs the 'prune' extra (torch-pruning)")


def _block(after_heading: str) -> str:
    """The first ```python block after the heading that starts with ``after_heading``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after_heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {after_heading!r}"
    return match.group(1)


# A digits CNN with a `layer2` (the README distils features of that name); data the README leaves out.
PRELUDE = textwrap.dedent("""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    import dlopt

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1 = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU())
            self.layer2 = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                              torch.nn.MaxPool2d(2), torch.nn.Flatten())
            self.head = torch.nn.Linear(16 * 4 * 4, 10)

        def forward(self, x):
            return self.head(self.layer2(self.layer1(x)))

    model = Net()
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1400], y[:1400]), batch_size=64,
                                               shuffle=True, generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for xb, yb in train_loader:
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimiser.step()
    model.eval()
    example = x[:1]
    x_test, y_test = x[1400:].numpy(), y[1400:].numpy()
""")


def test_the_pruning_and_distillation_example_runs_as_written(tmp_path):
    code = PRELUDE + _block("### Smaller models: pruning and distillation")
    # One torch (OpenMP) thread in the child, as DLOPT_THREADS=1 (tests/conftest.py) gives the runtimes one: the
    # training, distillation and ExecuTorch's export and calibration are tiny, and a second thread on a loaded
    # two-core machine spins in OpenMP's barrier (the whole run 70.9 -> 47.1 CPU-s; the same top-1 figures).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pruned = tmp_path / "build" / "pruned"
    assert {p.name for p in pruned.iterdir()} == {"model.pt", "model.onnx", "model.pt2", "prune.json", "pruned_state.pth"}
    saved = json.loads((tmp_path / "build" / "compressed" / "compress.json").read_text())
    rows = {r["name"]: r for r in saved["rows"]}
    assert rows["student"]["params"] < rows["teacher"]["params"]
    assert rows["teacher"]["accuracy"] > 0.8, rows  # the prelude's digits CNN, scored by compress on x_test
    assert 0.0 <= rows["student"]["accuracy"] <= 1.0, rows  # four epochs of distillation: scored, not judged
    assert "student compiled" in proc.stdout  # result.table() printed
