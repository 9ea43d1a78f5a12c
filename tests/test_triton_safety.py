"""Triton repositories shared with people and with other packaging runs: no lost versions, no user
files deleted, no link followed into the served repository."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading

import pytest

import models

pytest.importorskip("tritonclient", reason="Triton packaging needs tritonclient (pip install 'dlopt[triton]')")

import dlopt  # noqa: E402
from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.deploy.triton import MARKER, write_repository  # noqa: E402

ROUNDS = 10


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-safety")
    model = models.save(models.conv_bn_relu(batch="N"), root / "cnn.onnx")
    (root / "targets.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["fp32"]\n')
    dlopt.compile(model, target="here", targets_file=root / "targets.toml", out=root / "out", samples=2, runs=2,
                  warmup=0)
    return root / "out"


def _tree(folder) -> dict:
    """relative path -> sha256 (or '->target' for a link) of everything under ``folder``."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                tree[rel] = "->" + os.readlink(path)
            elif os.path.isfile(path):
                tree[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            else:
                tree[rel] = "dir"
    return tree


def test_concurrent_packaging_keeps_every_version(out, tmp_path):
    """Two packaging runs into one model at once (threads: flock conflicts between open files as between
    processes): both versions are served in every round (2 of 10 rounds lost one before the lock)."""
    for round_ in range(ROUNDS):
        repo = tmp_path / f"repo{round_}"
        errors = []

        def package(version):
            try:
                write_repository(out, repo, name="cnn", version=version)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=package, args=(v,)) for v in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        assert sorted(os.listdir(repo / "cnn")) == ["1", "2", "config.pbtxt", MARKER], round_
        assert json.loads((repo / "cnn" / MARKER).read_text())["versions"] == [1, 2]
        assert sorted(os.listdir(repo)) == ["cnn"]  # no lock or staging folder left in the repository
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"repo{i}" for i in range(ROUNDS)]


def test_repackaging_a_version_keeps_files_the_user_added(out, tmp_path):
    repo = tmp_path / "repo"
    write_repository(out, repo, name="cnn", version=1)
    (repo / "cnn" / "1" / "notes.txt").write_text("mine\n")
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=r"cnn/1 holds files dlopt did not write \(notes.txt\); nothing was changed"):
        write_repository(out, repo, name="cnn", version=1)
    assert _tree(tmp_path) == before
    # another version is added, and the user's file in version 1 is served on untouched
    write_repository(out, repo, name="cnn", version=2)
    assert (repo / "cnn" / "1" / "notes.txt").read_text() == "mine\n"
    assert sorted(os.listdir(repo / "cnn" / "2")) == ["model.onnx"]
    # dlopt's own files of a version are its to replace
    (repo / "cnn" / "2" / "model.onnx").write_bytes(b"stale")
    write_repository(out, repo, name="cnn", version=2)
    assert (repo / "cnn" / "2" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


@pytest.mark.parametrize("version", [1, 2])
def test_version_folder_that_is_a_link_is_refused(out, tmp_path, version):
    """REPO/cnn/1 replaced by a link to a folder of secrets: its files were copied into the served
    repository when packaging version 2."""
    repo = tmp_path / "repo"
    write_repository(out, repo, name="cnn", version=1)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "id_rsa").write_text("key\n")
    shutil.rmtree(repo / "cnn" / "1")
    (repo / "cnn" / "1").symlink_to(secrets)
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=r"cnn/1 is a link or not a folder"):
        write_repository(out, repo, name="cnn", version=version)
    assert _tree(tmp_path) == before


def test_link_inside_a_version_is_refused(out, tmp_path):
    repo = tmp_path / "repo"
    write_repository(out, repo, name="cnn", version=1)
    (tmp_path / "secret").write_text("key\n")
    (repo / "cnn" / "1" / "model.onnx").unlink()
    (repo / "cnn" / "1" / "model.onnx").symlink_to(tmp_path / "secret")
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=r"cnn/1/model.onnx is a link or not a regular file"):
        write_repository(out, repo, name="cnn", version=2)
    assert _tree(tmp_path) == before


def test_lock_held_by_another_run_is_waited_for_then_named(out, tmp_path):
    """A lock held longer than the wait: OutputBusy naming the holder, nothing written."""
    from dlopt.core.artifacts import output_lock
    from dlopt.core.errors import OutputBusy
    from dlopt.deploy.triton import lock_model

    repo = tmp_path / "repo"
    repo.mkdir()
    with output_lock((repo / "cnn").resolve()):
        with pytest.raises(OutputBusy, match=rf"another dlopt run \(pid {os.getpid()}\) is packaging {repo}/cnn"):
            with lock_model(repo / "cnn", wait=0.3):
                pass
    assert os.listdir(repo) == []


def test_swap_only_when_the_folder_is_still_as_read(out, tmp_path):
    """The "still ours" check before the swap (as move_into_place() has): a file the user drops into the model
    folder between reading it and the swap stops the swap; nothing is replaced."""
    from dlopt.deploy.triton import _snapshot, _swap

    repo = tmp_path / "repo"
    write_repository(out, repo, name="cnn", version=1)
    snapshot = _snapshot(repo / "cnn")
    (repo / "cnn" / "1" / "notes.txt").write_text("mine\n")
    staged = tmp_path / "staged"
    staged.mkdir()
    before = _tree(repo)
    with pytest.raises(ConfigError, match="changed while dlopt packaged it"):
        _swap(staged, repo / "cnn", snapshot)
    assert _tree(repo) == before and staged.is_dir()
    # a model folder that appeared meanwhile (it was not there when read)
    (repo / "other").mkdir()
    with pytest.raises(ConfigError, match="changed while dlopt packaged it"):
        _swap(staged, repo / "other", None)
    # an empty folder that was there is replaced
    write_repository(out, repo, name="other", version=3)
    assert sorted(os.listdir(repo / "other")) == ["3", "config.pbtxt", MARKER]


# Issue 23, item 6 as the security test found it in Triton packaging: the files to copy come from the
# output folder's manifest.files (or a bundle's report.json), so each must be a plain file inside it.

@pytest.fixture(scope="module")
def ov_out(tmp_path_factory):
    """An OpenVINO output (a host it does not run on: shipped untimed, in seconds)."""
    pytest.importorskip("openvino", reason="OpenVINO artefacts need openvino")
    root = tmp_path_factory.mktemp("triton-safety-ov")
    model = models.save(models.conv_bn_relu(batch="N"), root / "cnn.onnx")
    (root / "targets.toml").write_text('[targets.ov]\nbase = "cpu"\nbackends = ["openvino"]\nprecisions = ["fp32"]\n'
                                       'cpu_flags = ["dlopt-test-not-this-cpu"]\n')
    dlopt.compile(model, target="ov", targets_file=root / "targets.toml", out=root / "out", samples=2)
    return root / "out"


def _copy_out(out, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    return copy


def _list_in_manifest(out, name):
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"].append(name)
    (out / "manifest.json").write_text(json.dumps(manifest))


def _refused(out, tmp_path, match):
    """Packaging ``out`` raises ConfigError matching ``match``; the repository is left as it was (absent)."""
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=match):
        write_repository(out, tmp_path / "repo", name="m")
    assert _tree(tmp_path) == before and not (tmp_path / "repo" / "m").exists()


def test_external_data_that_is_a_link_out_of_the_folder_is_not_copied(out, tmp_path):
    """model.onnx.data -> a secret outside, listed in manifest.files: `dlopt package --triton` exited 0 and
    the served repository held the secret."""
    from cli import dlopt as run_dlopt

    secret = tmp_path / "secret_outside.txt"
    secret.write_text("TOP SECRET key material\n")
    out = _copy_out(out, tmp_path)
    (out / "model.onnx.data").symlink_to(secret)
    _list_in_manifest(out, "model.onnx.data")
    _refused(out, tmp_path, r"names the path 'model.onnx.data' \(.*\), which goes through the symlink")
    before = _tree(tmp_path)
    done = run_dlopt("package", out, "--triton", tmp_path / "repo", "--name", "m")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "goes through the symlink model.onnx.data" in done.stderr
    assert _tree(tmp_path) == before and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["model.onnx.x/../../../secret", "model.onnx.x/../../secret"])
def test_a_listed_file_that_climbs_out_is_not_copied(out, tmp_path, name):
    (tmp_path / "secret").write_text("outside file\n")
    out = _copy_out(out, tmp_path)
    (out / "model.onnx.x").mkdir()
    _list_in_manifest(out, name)
    _refused(out, tmp_path, r"names the path .*, which climbs out with '\.\.'")


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_listed_file_that_is_not_a_regular_file_is_refused(out, tmp_path, kind):
    """A FIFO would hang the copy; a folder would fail it as an internal error."""
    out = _copy_out(out, tmp_path)
    if kind == "fifo":
        os.mkfifo(out / "model.onnx.data")
    else:
        (out / "model.onnx.data").mkdir()
    _list_in_manifest(out, "model.onnx.data")
    _refused(out, tmp_path, r"model.onnx.data is not a regular file; dlopt (copies|loads) only( the)? plain files")


def test_model_onnx_that_is_a_link_is_refused(out, tmp_path):
    out = _copy_out(out, tmp_path)
    real = tmp_path / "elsewhere.onnx"
    shutil.move(out / "model.onnx", real)
    (out / "model.onnx").symlink_to(real)
    _refused(out, tmp_path, r"names the path 'model.onnx' .*goes through the symlink model.onnx")


def test_report_json_that_is_a_link_is_refused(out, tmp_path):
    """report.json names the model (the default Triton name) and goes into dlopt_package.json."""
    out = _copy_out(out, tmp_path)
    real = tmp_path / "report-elsewhere.json"
    shutil.move(out / "report.json", real)
    (out / "report.json").symlink_to(real)
    _refused(out, tmp_path, r"names the path 'report.json', which goes through the symlink report.json")


def test_openvino_weights_that_are_a_link_are_not_copied(ov_out, tmp_path):
    out = _copy_out(ov_out, tmp_path)
    shutil.move(out / "model.bin", tmp_path / "real.bin")
    (out / "model.bin").symlink_to(tmp_path / "real.bin")
    _refused(out, tmp_path, r"names the path 'model.bin' .*goes through the symlink model.bin")
    # the same output with its own file packages as before
    (out / "model.bin").unlink()
    shutil.copy(tmp_path / "real.bin", out / "model.bin")
    write_repository(out, tmp_path / "repo", name="m")
    assert sorted(os.listdir(tmp_path / "repo" / "m" / "1")) == ["model.bin", "model.xml"]
    assert not (tmp_path / "repo" / "m" / "1" / "model.bin").is_symlink()
    assert (tmp_path / "repo" / "m" / "1" / "model.bin").read_bytes() == (tmp_path / "real.bin").read_bytes()


def test_the_copy_itself_follows_no_link_and_waits_on_no_fifo(tmp_path):
    """What passed the checks is opened with O_NOFOLLOW|O_NONBLOCK: a link planted after the check is refused,
    a FIFO is refused at once (never waited on), and a plain file keeps its bytes and mode."""
    import time

    from dlopt.deploy.triton import _copy_plain, _plain_file

    (tmp_path / "secret").write_text("key\n")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "plain").write_bytes(b"weights")
    os.chmod(tmp_path / "plain", 0o640)
    with pytest.raises(ConfigError, match=r"link cannot be opened as a plain file"):
        _copy_plain(tmp_path / "link", tmp_path / "dest-link")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"fifo is not a regular file"):
        _copy_plain(tmp_path / "fifo", tmp_path / "dest-fifo")
    assert time.monotonic() - start < 5
    with pytest.raises(ConfigError, match=r"fifo is not a regular file"):
        _plain_file(tmp_path, "fifo")
    with pytest.raises(ConfigError, match=r"goes through the symlink link"):
        _plain_file(tmp_path, "link")
    assert _plain_file(tmp_path, "missing") is None
    _copy_plain(_plain_file(tmp_path, "plain"), tmp_path / "v" / "plain")
    assert (tmp_path / "v" / "plain").read_bytes() == b"weights"
    assert oct(os.stat(tmp_path / "v" / "plain").st_mode & 0o777) == "0o640"
    assert sorted(os.listdir(tmp_path)) == ["fifo", "link", "plain", "secret", "v"]
