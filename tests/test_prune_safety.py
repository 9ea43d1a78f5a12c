"""dlopt.prune and dlopt.load_module on folders and models that try to break them (issue 23, items 4 and 19):
a crafted pruned_state.pth or model.pt2 must not run code; nested and dict outputs, ints among the outputs and
shared parameters must not cost the classifier's classes or break the student."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning", reason="structured pruning needs torch-pruning (dlopt[prune])")
nn = torch.nn

import dlopt  # noqa: E402
from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.compression.pruning import load_module  # noqa: E402


class Net(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.hidden = nn.Linear(16, 32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.fc(torch.relu(self.hidden(x)))


def _net(seed: int = 0, cls=Net, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


def _x(batch: int = 1, seed: int = 0):
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class Payload:
    """Unpickling this runs ``touch MARKER``: the attack of item 4."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One prune and save for the file (about two seconds each): tests get their own copy of the folder."""
    result = dlopt.prune(_net(), _x(), 0.5)
    return result, result.save(tmp_path_factory.mktemp("pristine") / "pruned")


@pytest.fixture
def saved(pristine, tmp_path):
    """(prune result, a fresh copy of its saved folder): a test may tamper with its copy."""
    result, folder = pristine
    return result, Path(shutil.copytree(folder, tmp_path / "pruned"))


# -- item 4: nothing in a saved folder is unpickled ----------------------------------------------------

def test_load_module_into_rebuilds_from_tensors_and_plain_values(saved):
    result, folder = saved
    rebuilt = load_module(folder, into=_net(seed=3))
    assert (rebuilt.conv.out_channels, rebuilt.bn.num_features, rebuilt.hidden.in_features,
            rebuilt.hidden.out_features, rebuilt.fc.in_features, rebuilt.fc.out_features) == (8, 8, 8, 16, 16, 10)
    assert sum(p.numel() for p in rebuilt.parameters()) == result.report.params_after
    x = _x(4, seed=1)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), result.module(x), atol=1e-6)
    assert not rebuilt.training


def test_a_crafted_pruned_state_is_refused_and_its_payload_never_runs(saved, tmp_path):
    _, folder = saved
    marker = tmp_path / "marker"
    (folder / "pruned_state.pth").write_bytes(pickle.dumps({"full_state_dict": Payload(marker)}))
    with pytest.raises(ConfigError, match=r"pruned_state\.pth holds pickled Python objects, not only tensors; "
                                          r"dlopt does not unpickle them"):
        load_module(folder, into=_net())
    assert not marker.exists()


def test_a_torch_saved_payload_is_refused_too(saved, tmp_path):
    _, folder = saved
    marker = tmp_path / "marker"
    torch.save({"tensors": Payload(marker)}, folder / "pruned_state.pth")
    with pytest.raises(ConfigError, match="dlopt does not unpickle them"):
        load_module(folder, into=_net())
    assert not marker.exists()


def test_a_crafted_pt2_archive_is_refused_and_its_payload_never_runs(saved, tmp_path):
    """torch.export.load falls back to an unrestricted unpickler for a sample-inputs file the
    restricted one refuses: a crafted model.pt2 ran its payload before dlopt checked the archive."""
    _, folder = saved
    marker = tmp_path / "marker"
    original = folder / "model.pt2"
    crafted = io.BytesIO()
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                buffer = io.BytesIO()
                torch.save(Payload(marker), buffer)
                data = buffer.getvalue()
            dst.writestr(info, data)
    original.write_bytes(crafted.getvalue())
    with pytest.raises(ConfigError, match=r"model\.pt2 holds pickled Python objects"):
        load_module(folder)
    assert not marker.exists()


# -- item 4, second round: a model.pt2 is read only if it holds what save_module writes -------------

def _entries(folder) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(folder / "model.pt2") as archive:
        return [(info.filename, archive.read(info.filename)) for info in archive.infolist()]


def _write_pt2(folder, entries) -> None:
    """model.pt2 rewritten with ``entries`` as they are: repeated names included (zipfile warns, torch reads)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        warnings.simplefilter("ignore")
        for name, data in entries:
            archive.writestr(name, data)
    (folder / "model.pt2").write_bytes(buffer.getvalue())


def _refused(folder, pattern: str) -> str:
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_module(folder)
    message = str(caught.value)
    assert "\n" not in message
    return message


TENSOR_META = {"dtype": 1, "sizes": [{"as_int": 8}], "requires_grad": False, "device": {"type": "cpu", "index": None},
               "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}


@pytest.mark.parametrize("path_name", ["opaque_obj_0", "custom_obj_0"])
def test_an_opaque_or_custom_object_constant_is_refused_whatever_use_pickle_says(saved, tmp_path, path_name):
    """torch runs pickle.loads on any opaque_obj_* constant (torch._C._pickle_load_obj on custom_obj_*) even
    with use_pickle false: the first check looked at the flag only, and the payload ran."""
    _, folder = saved
    marker = tmp_path / "marker"
    entries = []
    for name, data in _entries(folder):
        if name.endswith("data/constants/model_constants_config.json"):
            config = json.loads(data)
            config["config"]["evil"] = {"path_name": path_name, "is_param": False, "use_pickle": False,
                                        "tensor_meta": TENSOR_META}
            data = json.dumps(config).encode()
            entries.append((name, data))
            entries.append((name.replace("model_constants_config.json", path_name), pickle.dumps(Payload(marker))))
        else:
            entries.append((name, data))
    _write_pt2(folder, entries)
    message = _refused(folder, rf"model\.pt2 holds pickled Python objects \(.*{path_name}")
    assert "dlopt does not unpickle them" in message
    assert not marker.exists()


def _constructor_library(tmp_path, marker) -> bytes:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the native library of the attack")
    source = tmp_path / "evil.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) '
                      f'{{ FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }} }}\n')
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "evil.so"), str(source)], check=True)
    return (tmp_path / "evil.so").read_bytes()


@pytest.mark.parametrize("extra", [
    ["data/aotinductor/model/x.wrapper_metadata.json", "data/aotinductor/model/x.wrapper.so"],
    ["data/aotinductor/m/m_wrapper_metadata.json", "data/aotinductor/m/m_wrapper.so"],
    ["data/weights/evil.so"],
])
def test_native_code_in_the_archive_is_refused_and_never_loaded(saved, tmp_path, extra):
    """torch.export.load unpacks data/aotinductor/<name>/ and dlopens its .so (AOTInductor): the library's
    constructor wrote the marker while the first check looked only at configs and sample inputs."""
    _, folder = saved
    marker = tmp_path / "marker"
    library = _constructor_library(tmp_path, marker)
    root = _entries(folder)[0][0].split("/", 1)[0]
    added = [(f"{root}/{name}", library if name.endswith(".so") else json.dumps({"AOTI_DEVICE_KEY": "cpu"}).encode())
             for name in extra]
    _write_pt2(folder, _entries(folder) + added)
    _refused(folder, rf"model\.pt2 holds native code \({re.escape(extra[0])}\); dlopt does not load native "
                     rf"libraries from a saved module")
    assert not marker.exists()


@pytest.mark.parametrize("order", ["evil first", "evil last"])
def test_an_entry_written_twice_is_refused(saved, tmp_path, order):
    """Python's zipfile reads the last copy of a repeated name, torch's reader the first: the check read the
    benign copy while torch unpickled the one with use_pickle true."""
    _, folder = saved
    marker = tmp_path / "marker"
    evil = json.dumps({"config": {"c": {"path_name": "tensor_0", "is_param": False, "use_pickle": True,
                                        "tensor_meta": None}}}).encode()
    entries = []
    for name, data in _entries(folder):
        if name.endswith("data/constants/model_constants_config.json"):
            entries += [(name, evil), (name, data)] if order == "evil first" else [(name, data), (name, evil)]
            entries.append((name.replace("model_constants_config.json", "tensor_0"), pickle.dumps(Payload(marker))))
        else:
            entries.append((name, data))
    _write_pt2(folder, entries)
    _refused(folder, r"model\.pt2 holds two entries named data/constants/model_constants_config\.json; ")
    assert not marker.exists()


def test_names_that_differ_only_in_case_are_refused(saved):
    """torch's zip reader looks names up without regard to case."""
    _, folder = saved
    entries = _entries(folder)
    name, data = next((n, d) for n, d in entries if n.endswith("model_weights_config.json"))
    _write_pt2(folder, [(name.replace("model_weights", "Model_Weights"), data), *entries])
    _refused(folder, r"model\.pt2 holds (two entries named|data/weights/Model_Weights_config\.json)")


@pytest.mark.parametrize("name", ["extra/notes.txt", "models/other.json", "data/executorch/program.pte",
                                  "data/weights/model.pt", "data/constants/model.pt", "data/sample_inputs/other.pt",
                                  "data/mtia/x", "xl_model_weights/model_param_config"])
def test_an_entry_save_module_never_writes_is_refused(saved, name):
    _, folder = saved
    entries = _entries(folder)
    root = entries[0][0].split("/", 1)[0]
    _write_pt2(folder, [*entries, (f"{root}/{name}", b"{}")])
    _refused(folder, rf"model\.pt2 holds (pickled Python objects \()?{re.escape(name)}")


def test_an_entry_outside_the_archive_root_is_refused(saved):
    """torch.export.load falls back to the 2.7 layout (plain pickles) when it finds a top-level 'version'."""
    _, folder = saved
    _write_pt2(folder, [*_entries(folder), ("version", b"1.0")])
    _refused(folder, r"model\.pt2 holds version, which dlopt\.prune does not write")


def _edit_program(folder, edit) -> None:
    entries = [(n, json.dumps(edit(json.loads(d))).encode() if n.endswith("models/model.json") else d)
               for n, d in _entries(folder)]
    _write_pt2(folder, entries)


def _with_expr(program, expr):
    text = json.dumps(program)
    assert "\"expr_str\": \"Symbol('s" in text  # save_module's dynamic batch
    return json.loads(re.sub(r'"expr_str": "Symbol\(([^"]*)\)"', lambda m: json.dumps({"expr_str": expr})[1:-1],
                             text, count=1))


def test_python_in_model_json_is_refused_and_never_runs(saved, tmp_path):
    """torch's deserializer hands every expr_str to sympy.sympify, which evals it, and execs guards_code: a
    model.pt2 holding only the entries save_module writes still ran its payload through model.json."""
    _, folder = saved
    marker = tmp_path / "marker"
    payload = f"__import__('os').system('touch {marker}') + Symbol('s1', positive=True, integer=True)"
    _edit_program(folder, lambda program: _with_expr(program, payload))
    _refused(folder, r"models/model\.json holds the shape expression .__import__\(.* which dlopt\.prune does not "
                     r"write and torch would run as Python")
    _edit_program(folder, lambda program: {**program, "guards_code": [f"__import__('os').system('touch {marker}')"]})
    _refused(folder, r"models/model\.json holds guard code, which dlopt\.prune does not write")
    assert not marker.exists()


def _first_node(program, **changes):
    program["graph_module"]["graph"]["nodes"][0].update(changes)
    return program


def _signature(program, **changes):
    program["graph_module"]["module_call_graph"][0]["signature"].update(changes)
    return program


@pytest.mark.parametrize(("edit", "refusal"), [
    (lambda p: _first_node(p, target="torch.os.system"), r"a call of 'torch\.os\.system', not a torch operator"),
    (lambda p: _first_node(p, target="torch.ops.import_module.__func__.__call__"), r"a call of 'torch\.ops\.import_"),
    (lambda p: _signature(p, forward_arg_names=["x: __import__('os').getcwd()"]), r"the argument name .x: __imp"),
    (lambda p: _signature(p, in_spec=json.dumps([1, {"type": "builtins.dict", "context": json.dumps(["a']+[0][0"]),
                                                     "children_spec": []}])), r"the pytree key .a'\]\+"),
])
def test_names_torch_turns_into_code_are_refused(saved, edit, refusal):
    """Node targets are looked up by name, argument names and pytree keys pasted into the forward's source."""
    _, folder = saved
    _edit_program(folder, edit)
    _refused(folder, r"models/model\.json holds " + refusal)


def test_shape_expressions_save_module_writes_are_accepted():
    from dlopt.compression.pt2_check import _plain_expr

    for expr in ["Symbol('s77', positive=True, integer=True)", "2*s77 + 1", "FloorDiv(s77, 2)", "Max(1, s0)"]:
        assert _plain_expr(expr), expr
    for expr in ["s1**9**9", "Symbol('s1').func", "s1 if True else s2", "lambda1", "eval('1')", "Pow(s1, 2)"]:
        assert not _plain_expr(expr), expr


class WithConstants(nn.Module):
    """A non-persistent buffer, a tensor attribute and a tensor made in forward: torch.export writes them as
    data/constants/tensor_N."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("offset", torch.ones(3), persistent=False)
        self.scale = torch.arange(3.0)

    def forward(self, x):
        return self.fc(x) * self.scale + self.offset + torch.tensor([1.0, 2.0, 3.0])


class ShapeArithmetic(nn.Module):
    """Shapes computed from the dynamic batch: model.json holds Mul/FloorDiv expressions and _operator calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x).reshape(x.shape[0] * 3, 1)
        return y.reshape(x.shape[0], 3) + x.shape[0] // 2


@pytest.mark.parametrize(("cls", "constants"), [(WithConstants, 3), (ShapeArithmetic, 0)])
def test_what_save_module_writes_still_loads(tmp_path, cls, constants):
    model = _net(cls=cls)
    folder = dlopt.compression.pruning.save_module(model, torch.randn(1, 4), tmp_path / "saved")
    assert sum(n.split("/")[-1].startswith("tensor_") for n, _ in _entries(folder)) == constants
    loaded = load_module(folder)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))


def test_a_folder_without_the_description_is_refused(saved, tmp_path):
    _, folder = saved
    other = shutil.copytree(folder, tmp_path / "other")
    (other / "prune.json").unlink()
    with pytest.raises(ConfigError, match="not a folder written by dlopt.prune"):
        load_module(other, into=_net())


def test_into_an_instance_of_another_class_is_a_one_line_error(saved):
    _, folder = saved
    with pytest.raises(ConfigError,
                       match=r"into \(Sequential\) does not match the saved module: it has no .bn\.bias.") as caught:
        load_module(folder, into=nn.Sequential(nn.Linear(2, 2)))
    assert "\n" not in str(caught.value)


# -- item 19: every output tensor finds its layer; shared parameters are not split -------------------

class DictOut(Net):
    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)
        h = torch.relu(self.hidden(x))
        return {"logits": self.fc(h), "extra": {"pooled": x}}


class NestedOut(Net):
    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)
        h = torch.relu(self.hidden(x))
        return (x, [(self.fc(h),)])


class IntOut(Net):
    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.fc(torch.relu(self.hidden(x))), 3


class SoftmaxOut(Net):
    def forward(self, x):
        return {"probs": torch.softmax(super().forward(x), dim=-1)}


def _leaves(value):
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return [t for v in items for t in _leaves(v)]


@pytest.mark.parametrize(("cls", "conv"), [(DictOut, 16), (NestedOut, 16), (IntOut, 8),
                                           (SoftmaxOut, 8)])
def test_the_classifier_keeps_its_classes_whatever_the_outputs_look_like(cls, conv):
    """DictOut and NestedOut also return the pooled features: the conv's channels are an output too."""
    model = _net(cls=cls)
    pruned, report = dlopt.prune(model, _x(), 0.5)
    assert (pruned.fc.out_features, pruned.hidden.out_features, pruned.conv.out_channels) == (10, 16, conv)
    assert report.kept_whole["fc"] == "produces the model's output"
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in _leaves(pruned(_x(3)))]
    assert shapes == [tuple(t.shape) for t in _leaves(model(_x(3)))]
    assert (3, 10) in shapes


class NoTensorOut(Net):
    def forward(self, x):
        return 3


def test_a_model_with_no_tensor_output_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^NoTensorOut returned no tensor \(it returned int\); prune takes a "
                                          r"model whose outputs are tensors"):
        dlopt.prune(_net(cls=NoTensorOut), _x(), 0.5)


class TiedLM(nn.Module):
    """An embedding tied to the output head (GPT-2's wte/lm_head), a hidden Linear between."""

    def __init__(self, vocab: int = 24, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, 32)
        self.back = nn.Linear(32, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.back(torch.relu(self.mix(self.embed(ids))))))


class TwiceUsed(nn.Module):
    """One Linear applied twice (a weight-shared block), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.shared = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.fc(torch.relu(self.shared(torch.relu(self.shared(h)))))


def test_tied_embedding_and_head_stay_tied_and_whole(tmp_path):
    model = _net(cls=TiedLM)
    ids = torch.randint(0, 24, (2, 5), generator=torch.Generator().manual_seed(0))
    before = sum(p.numel() for p in model.parameters())
    assert before == 24 * 16 + 16 * 32 + 32 + 32 * 16 + 16  # 1456, the head shares the embedding's weight
    pruned, report = dlopt.prune(model, ids, 0.5)
    assert pruned.head.weight is pruned.embed.weight and tuple(pruned.embed.weight.shape) == (24, 16)
    assert (pruned.mix.out_features, pruned.back.in_features, pruned.back.out_features) == (16, 16, 16)
    after = sum(p.numel() for p in pruned.parameters())
    assert after == report.params_after == 24 * 16 + 16 * 16 + 16 + 16 * 16 + 16  # 928: only mix/back's middle
    assert report.kept_whole["head"].startswith("shares its weight with embed")
    assert report.kept_whole["back"].startswith("its channels are tied to")
    with torch.no_grad():
        assert tuple(pruned(ids).shape) == (2, 5, 24)
    # saved and rebuilt into a fresh instance: still one weight, still the same function
    rebuilt = load_module(dlopt.compression.pruning.save_module(pruned, ids, tmp_path / "lm"), into=_net(seed=5, cls=TiedLM))
    assert rebuilt.head.weight is rebuilt.embed.weight and sum(p.numel() for p in rebuilt.parameters()) == 928
    with torch.no_grad():
        assert torch.allclose(rebuilt(ids), pruned(ids))


def test_a_linear_used_twice_is_kept_whole_and_the_student_runs():
    model = _net(cls=TwiceUsed)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    pruned, report = dlopt.prune(model, x, 0.5)
    assert (pruned.shared.in_features, pruned.shared.out_features) == (16, 16)
    assert pruned.inp.out_features == 16 and pruned.fc.in_features == 16
    assert report.kept_whole["shared"] == "runs 2 times in one forward pass (its weights are shared)"
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x))  # nothing could be pruned without breaking the reuse
