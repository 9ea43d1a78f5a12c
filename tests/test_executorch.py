"""ExecuTorch candidates of real classifiers on real data: a CNN and a small transformer, trained here on
scikit-learn's digits (8x8 handwritten digits, 1,797 images), compiled from the PyTorch module for an
rpi5-class target (every candidate ships, in bundle/), checked against the module itself in torch.

fp32 must match the module to 1e-4 relative; INT8 (PT2E with XNNPACK's quantizer, calibrated on
training images) must keep top-1 on the held-out images within the budget, counted here from the
.pte's own outputs, not from dlopt's report.  Both open through ``dlopt.load`` and through the output's
run_candidates.py in a process where dlopt cannot be imported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the ExecuTorch backend builds from PyTorch modules")
pytest.importorskip("executorch", reason="executorch is not installed (pip install 'dlopt[executorch]')")
pytest.importorskip("sklearn", reason="scikit-learn's digits are the labelled data")

import cli  # noqa: E402
import dlopt  # noqa: E402

BUDGET_PP = 2.0
TARGET = ('[targets.board]\nbase = "rpi5"\nbackends = ["executorch"]\nprecisions = ["fp32", "int8"]\n')


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 - 0.5)[:, None]  # [N, 1, 8, 8]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1300], y[:1300], x[1300:1500], x[1500:], y[1500:]  # train, calibration, test (297)


class Cnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2))
        self.head = torch.nn.Linear(128, 10)

    def forward(self, image):
        return self.head(torch.flatten(self.features(image), 1))


class TinyTransformer(torch.nn.Module):
    """Each image row a token: embedding, one pre-norm self-attention block with an MLP, mean pool, head."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Linear(8, dim)
        self.position = torch.nn.Parameter(torch.zeros(1, 8, dim))
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, image):
        tokens = self.embed(image.reshape(image.shape[0], 8, 8)) + self.position
        b, t, d = tokens.shape
        q, k, v = self.qkv(self.norm1(tokens)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        tokens = tokens + self.proj((attention @ v).transpose(1, 2).reshape(b, t, d))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(tokens.mean(dim=1))


def _train(module, x, y, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(module.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    module.train()
    for _ in range(epochs):
        for i in torch.randperm(len(xs)).split(64):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(module(xs[i]), ys[i]).backward()
            optimiser.step()
    return module.eval()


@pytest.fixture(scope="module", params=["cnn", "transformer"])
def compiled(request, tmp_path_factory):
    # One torch thread for training, export and calibration: these models are tiny, and a second
    # thread on a loaded two-core machine spins in OpenMP's barrier (the transformer's 15 epochs took
    # ~50 CPU-s on two threads, 1.4 CPU-s on one). The .pte's own thread count comes from the target.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compiled(request, tmp_path_factory)
    finally:
        torch.set_num_threads(threads_before)


def _compiled(request, tmp_path_factory):
    x_train, y_train, x_calib, x_test, y_test = _digits()
    module = Cnn() if request.param == "cnn" else TinyTransformer()
    module = _train(module, x_train, y_train, epochs=15)
    root = tmp_path_factory.mktemp(f"executorch-{request.param}")
    (root / "t.toml").write_text(TARGET)
    np.savez(root / "calib.npz", image=x_calib)
    np.savez(root / "eval.npz", image=x_test, labels=y_test)
    out = root / "out"
    report = dlopt.compile(module, example=torch.from_numpy(x_test[:1]), target="board", targets_file=root / "t.toml",
                           out=out, inputs=root / "eval.npz", calib=root / "calib.npz", calib_samples=200,
                           max_accuracy_drop=BUDGET_PP, runs=5, warmup=1, progress=False)
    with torch.no_grad():
        expected = module(torch.from_numpy(x_test)).numpy()
    return {"name": request.param, "report": report, "out": out, "x": x_test, "y": y_test, "expected": expected,
            "root": root}


def _folder(c, key):
    cand = next(k for k in c["report"].candidates if k.key == key)
    assert cand.status == "ok", cand.reason
    return c["out"] / cand.artifact_dir


def _outputs(session, x):
    return np.concatenate([session.run({"image": x[i:i + 1]})[0] for i in range(len(x))])


def test_fp32_matches_the_module_through_dlopt_load(compiled):
    folder = _folder(compiled, "executorch/fp32")
    assert (folder / "model.pte").is_file()
    got = _outputs(dlopt.load(folder), compiled["x"])
    expected = compiled["expected"]
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"\n{compiled['name']} executorch/fp32 vs torch on {len(expected)} test images: max rel error {rel:.2e}")
    assert rel <= 1e-4
    settings = json.loads((folder / "executorch.json").read_text())
    assert settings["threads"] == 4  # the rpi5's cores, not this host's
    assert settings["inputs"] == [{"name": "image", "dtype": "float32", "shape": [1, 1, 8, 8]}]


def test_int8_keeps_top1_within_the_budget_on_held_out_digits(compiled):
    folder = _folder(compiled, "executorch/int8")
    got = _outputs(dlopt.load(folder), compiled["x"])
    torch_top1 = float((compiled["expected"].argmax(1) == compiled["y"]).mean())
    int8_top1 = float((got.argmax(1) == compiled["y"]).mean())
    print(f"\n{compiled['name']} top-1 on {len(got)} held-out digits: torch {torch_top1:.4f}, executorch/int8 "
          f"{int8_top1:.4f} ({(torch_top1 - int8_top1) * 100:+.2f} pp)")
    assert torch_top1 >= 0.9  # a classifier worth quantising
    assert (torch_top1 - int8_top1) * 100 <= BUDGET_PP
    assert 0 < np.abs(got - compiled["expected"]).max()  # quantised, not the float program again
    settings = json.loads((folder / "executorch.json").read_text())
    assert "XNNPACKQuantizer" in settings["quantizer"] and "per-channel" in settings["quantizer"]
    cand = next(k for k in compiled["report"].candidates if k.key == "executorch/int8")
    assert cand.quantiser.startswith("torchao ") and cand.score.drop_pp <= BUDGET_PP


def test_run_candidates_runs_both_without_dlopt(compiled, tmp_path):
    blocker = tmp_path / "block"
    (blocker / "dlopt").mkdir(parents=True)
    (blocker / "dlopt" / "__init__.py").write_text("raise ImportError('dlopt is not on this device')\n")
    report_file = tmp_path / "device_report.json"
    done = subprocess.run([sys.executable, str(compiled["out"] / "run_candidates.py"), "--verify-only", "--report",
                           str(report_file), "--candidate", "executorch/fp32", "--candidate", "executorch/int8"],
                          env={"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["key"]: r for r in json.loads(report_file.read_text())["candidates"]}
    assert rows["executorch/fp32"]["verified"] is True and rows["executorch/fp32"]["rel_error"] < 1e-4
    assert rows["executorch/int8"]["verified"] is True


def test_an_onnx_file_alone_is_refused_in_one_line(compiled, tmp_path):
    from dlopt.core.errors import ModelError

    if compiled["name"] != "cnn":
        pytest.skip("once is enough")
    model = tmp_path / "m.onnx"  # the CNN as ONNX: the compile's own export of it, beside its output
    shutil.copyfile(compiled["out"] / "model.onnx", model)
    with pytest.raises(ModelError, match=r"executorch/fp32: built from a PyTorch module only") as refused:
        dlopt.compile(model, target="board", targets_file=compiled["root"] / "t.toml", out=tmp_path / "out",
                      precision="fp32", samples=2, runs=2, progress=False, max_accuracy_drop=100.0)
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


def test_the_rpi5_bundle_ships_the_board_runtime_and_verifies_under_emulation(compiled):
    """The target is an rpi5: each .pte ships with ExecuTorch's runtime built for aarch64 (no torch on the
    board), and `dlopt verify` runs both under qemu-aarch64 (a Cortex-A76), labelled emulated."""
    from dlopt.device.emulation import aarch64_python

    if compiled["name"] != "cnn":
        pytest.skip("once is enough")
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (apt-get install g++-aarch64-linux-gnu)")
    if isinstance(aarch64_python(), str):
        pytest.skip(f"no emulated aarch64 here: {aarch64_python()}")
    for key in ("executorch/fp32", "executorch/int8"):
        folder = _folder(compiled, key)
        settings = json.loads((folder / "executorch.json").read_text())
        assert settings["native"] == {"arch": "aarch64", "mcpu": "cortex-a76", "library": "libpte_run.so"}
        assert (folder / "libpte_run.so").read_bytes()[18] == 183  # ELF e_machine: AArch64
    done = cli.dlopt("verify", compiled["out"], "--json", "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["key"]: r for r in json.loads(done.stdout)["candidates"]}
    for key in ("executorch/fp32", "executorch/int8"):
        assert rows[key]["verified"] is True and rows[key]["ran_as"].startswith("qemu-aarch64 emulation"), rows[key]
    assert rows["executorch/fp32"]["rel_error"] < 1e-4
