"""dlopt.prune (torch-pruning), dlopt.distill and dlopt.compress on real torch modules, ORT and digits data."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning", reason="structured pruning needs torch-pruning (dlopt[prune])")
nn = torch.nn

import dlopt  # noqa: E402
from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.compression.distillation import kd_loss  # noqa: E402
from dlopt.compression.pruning import load_module  # noqa: E402


class Block(nn.Module):
    """A residual block with a 1x1 downsample when the width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + identity)


class ResNetish(nn.Module):
    """Stem, two residual stages, a depthwise + grouped branch concatenated with a 1x1 branch, a classifier."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(Block(width, width), Block(width, width))
        self.stage2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, groups=2 * width)
        self.grouped = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, groups=4)
        self.pointwise = nn.Conv2d(2 * width, width, 1)
        self.fc = nn.Linear(3 * width, classes)

    def forward(self, input):  # noqa: A002 - names the ONNX input
        x = self.stage2(self.stage1(self.stem(input)))
        x = torch.cat([self.grouped(self.depthwise(x)), self.pointwise(x)], dim=1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _net(width: int = 16, seed: int = 0) -> ResNetish:
    torch.manual_seed(seed)
    return ResNetish(width).eval()


def _x(batch: int = 1, size: int = 8, seed: int = 0):
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_pruning_a_residual_network_halves_every_group_and_keeps_the_output():
    model = _net(16)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    pruned, report = dlopt.prune(model, _x(), 0.5)
    layers = {layer.name: layer for layer in report.layers}
    # residual Adds: stem, both stage1 blocks' conv2 and the stage-2 downsample/conv2 stay equal
    assert pruned.stem[0].out_channels == 8
    assert [pruned.stage1[i].conv2.out_channels for i in (0, 1)] == [8, 8]
    assert pruned.stage2[0].down[0].out_channels == pruned.stage2[0].conv2.out_channels == 16
    assert pruned.stage2[1].conv2.out_channels == 16 and pruned.stage2[1].conv1.in_channels == 16
    # depthwise keeps groups == channels; the grouped conv keeps its 4 groups on half the channels
    assert pruned.depthwise.out_channels == pruned.depthwise.groups == 16
    assert (pruned.grouped.in_channels, pruned.grouped.out_channels, pruned.grouped.groups) == (16, 16, 4)
    # the concatenation of 16 + 8 channels feeds a classifier that now reads 8 + 4 ... of its 48 inputs
    assert pruned.pointwise.out_channels == 8
    assert (pruned.fc.in_features, pruned.fc.out_features) == (24, 10)
    assert report.kept_whole == {"fc": "produces the model's output"}
    assert layers["stage2.0.conv1"].out_before == 32 and layers["stage2.0.conv1"].out_after == 16
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert 0.2 < report.macs_after / report.macs_before < 0.3  # both sides of each conv halved
    assert tuple(pruned(_x(3)).shape) == (3, 10)
    # the argument is untouched
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert model.stem[0].out_channels == 16


def test_ignored_layers_and_their_tied_channels_are_named():
    model = _net(16)
    pruned, report = dlopt.prune(model, _x(), 0.5, ignored_layers=["stage1.0.conv2"], round_to=4)
    kept = report.kept_whole
    assert kept["stage1.0.conv2"] == "in ignored_layers"
    # the stem and every layer adding into that residual stream keep their 16 channels
    assert pruned.stem[0].out_channels == 16 and pruned.stage1[1].conv2.out_channels == 16
    assert "tied to stage1.0.conv2" in kept["stem.0"]
    assert pruned.stage1[0].conv1.out_channels == 8  # inside the block: free to prune
    assert all(layer.out_after % 4 == 0 for layer in report.layers if layer.name != "fc")


@pytest.mark.parametrize("bad, message", [
    ({"ratio": 1.0}, "between 0 and 1"),
    ({"importance": "taylor"}, "unknown importance 'taylor'"),
    ({"ignored_layers": ["nope"]}, "'nope' is not a module"),
])
def test_bad_arguments_are_one_line_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        dlopt.prune(_net(8), _x(), **{"ratio": 0.5, **bad})


def test_the_pruned_model_reloads_without_its_class_and_as_onnx(tmp_path):
    import onnxruntime as ort

    result = dlopt.prune(_net(16), _x(), 0.5)
    folder = result.save(tmp_path / "pruned")
    x = _x(3, seed=1)
    with torch.no_grad():
        expected = result.module(x).numpy()
        class_free = load_module(folder)  # model.pt2: a GraphModule, no ResNetish needed
        assert type(class_free).__name__ != "ResNetish"
        assert np.abs(class_free(x).numpy() - expected).max() < 1e-5
        rebuilt = load_module(folder, into=_net(16, seed=7))  # a fresh unpruned instance, rebuilt
        assert rebuilt.stage2[0].conv1.out_channels == 16
        assert np.abs(rebuilt(x).numpy() - expected).max() < 1e-5
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() < 1e-4
    saved = json.loads((folder / "prune.json").read_text())
    assert saved["layers"]["stage2.0.conv1"] == ["Conv2d", 16, 8]  # out 32 -> 16, in 16 -> 8
    assert saved["report"]["params_after"] == result.report.params_after
    # a folder dlopt did not write is refused before any work
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by dlopt.prune"):
        result.save(theirs)
    assert (theirs / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "theirs"]  # no staging left


# -- distillation -------------------------------------------------------------------------------------

def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 - 0.5)[:, None]  # 1797 x 1 x 8 x 8
    return torch.from_numpy(x), torch.from_numpy(digits.target.astype(np.int64))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """8x8 images: one thread is faster than two fighting over tiny kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    """ResNetish(16) trained on 1500 digits for 3 epochs (a few seconds)."""
    x, y = _digits()
    model = _net(16).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in torch.randperm(1500, generator=torch.Generator().manual_seed(0)).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert accuracy > 0.85, accuracy  # a teacher worth distilling from
    return model


def test_distillation_lowers_the_kd_loss_on_a_fixed_batch(teacher):
    x, y = _digits()
    student, _ = dlopt.prune(teacher, x[:1], 0.5)
    teacher_state = {n: p.clone() for n, p in teacher.state_dict().items()}
    fixed = x[1500:1628]
    with torch.no_grad():
        before = kd_loss(student(fixed), teacher(fixed)).item()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1500], y[:1500]), batch_size=64,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    events = []
    student, history = dlopt.distill(teacher, student, loader, epochs=2, alpha=0.9, lr=3e-3,
                                     feature_pairs={"stage2": "stage2"}, eval_loader=[(x[1500:], y[1500:])],
                                     callbacks=[events.append])
    with torch.no_grad():
        after = kd_loss(student(fixed), teacher(fixed)).item()
    assert after < 0.5 * before, (before, after)
    assert [e.kind for e in events].count("step") == 2 * len(loader)
    assert [e.epoch for e in history] == [1, 2] and history[1].kd_loss < history[0].kd_loss
    # stage2 is 16 channels in the student, 32 in the teacher: a learned 1x1 projection matched them
    assert history[1].feature_loss < history[0].feature_loss
    assert history[1].accuracy > 0.8
    assert not student.training
    assert all(torch.equal(teacher_state[n], p) for n, p in teacher.state_dict().items())  # teacher untouched


def test_distill_rejects_feature_names_that_are_not_modules(teacher):
    x, y = _digits()
    with pytest.raises(ConfigError, match="'nope'"):
        dlopt.distill(teacher, _net(8), [(x[:8], y[:8])], feature_pairs={"nope": "stage2"})
    # a teacher name that is not there: the student's hook, already on, comes off again
    student = _net(8)
    with pytest.raises(ConfigError, match="'nope'"):
        dlopt.distill(teacher, student, [(x[:8], y[:8])], feature_pairs={"stage2": "nope"})
    assert not any(m._forward_hooks for m in student.modules()) and not any(m._forward_hooks for m in teacher.modules())


def test_compress_prunes_distils_exports_compiles_and_puts_them_side_by_side(teacher, tmp_path):
    x, y = _digits()
    toml = tmp_path / "dlopt.toml"
    toml.write_text('[targets.host-ort]\nbase = "cpu"\nbackends = ["ort"]\n')
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1500], y[:1500]), batch_size=64,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "compressed"
    teacher.train()  # compress evaluates, prunes, distils and exports in eval mode, then leaves the mode as it was
    torch_before = torch.get_num_threads()
    torch.set_num_threads(3)  # compress runs torch on its own threads (1 here), then puts the caller's back
    result = dlopt.compress(teacher, x[:1], loader, eval=(x[1500:].numpy(), y[1500:].numpy()), ratio=0.5,
                            target="host-ort", targets_file=toml, out=out, epochs=2, lr=3e-3, runs=10, precision="fp32",
                            threads=1)
    threads_after, _ = torch.get_num_threads(), torch.set_num_threads(torch_before)
    assert threads_after == 3
    assert teacher.training
    teacher.eval()
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["teacher", "pruned", "student", "teacher compiled", "student compiled"]
    assert rows["student"].params == result.prune.params_after < 0.3 * rows["teacher"].params
    assert rows["teacher"].accuracy > 0.85 and rows["student"].accuracy > max(0.8, rows["pruned"].accuracy)
    assert rows["student compiled"].what == "compiled/: ort/fp32 for host-ort"
    assert abs(rows["student compiled"].accuracy - rows["student"].accuracy) < 0.01  # the same function, exported
    assert abs(rows["teacher compiled"].accuracy - rows["teacher"].accuracy) < 0.01
    assert all(r.latency["runs"] >= 10 for r in result.rows)
    assert rows["student"].size_bytes < rows["teacher"].size_bytes
    saved = json.loads((out / "compress.json").read_text())
    assert [r["name"] for r in saved["rows"]] == list(rows)
    assert "| teacher " in (out / "compress.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["compiled", "compiled-teacher", "compress.json", "compress.md",
                                                     "manifest.json", "models", "student"]
    with torch.no_grad():  # the student reloads without its class; the compiled artefact serves it
        reloaded = load_module(out / "student")
        expected = result.student(x[1500:1508]).numpy()
        assert np.abs(reloaded(x[1500:1508]).numpy() - expected).max() < 1e-5
    with dlopt.load(out / "compiled") as runner:
        assert np.abs(runner.run({"input": x[1500:1508].numpy()})[0] - expected).max() < 1e-4
