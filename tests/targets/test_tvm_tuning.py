"""MetaSchedule tuning on real TVM: a database per model and target, resumed after SIGKILL, applied to builds."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")
pytest.importorskip("xgboost", reason="MetaSchedule's cost model needs xgboost (install dlopt[tvm])")
pytest.importorskip("psutil", reason="MetaSchedule needs psutil (install dlopt[tvm])")

import models  # noqa: E402
from helpers import random_feed, run_ort  # noqa: E402

from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.core.profiles import _host_cpu_flags, resolve_target  # noqa: E402
from dlopt.targets.tvm import tuning as tt  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
# One thread, as tests/test_tune.py: on a loaded 2-core machine TVM's pool of two spins against itself while
# trials are timed (a kernel's best 8.9 ms with two threads, 0.52 ms with one; 35.5 -> 34.2 CPU-s for 8 trials).
# OTHER is another thread count, so another target.
THREADS, OTHER = 1, 2


def tiny():
    return ir.serde.deserialize_model(models.conv_bn_relu(channels=8, size=16))


def host_db(root, model=None, threads: int = THREADS) -> tt.TuningDatabase:
    target = tt.tuning_target(resolve_target("cpu"), threads)
    return tt.TuningDatabase(Path(root), tt.model_digest(model or tiny()), target)


def _popen_workers() -> dict[int, str]:
    """TVM's popen workers under this process: pid -> the libraries and files mapped into it."""
    import psutil

    workers = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if "tvm.exec.popen_worker" in child.cmdline():
                workers[child.pid] = Path(f"/proc/{child.pid}/maps").read_text()
        except (psutil.Error, OSError):
            pass  # a worker recycled meanwhile
    return workers


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The tiny CNN tuned for 8 trials on this host (one database shared by the tests below): a child process
    tunes it and is killed with SIGKILL once 3 trials are recorded, then this process resumes it to 8 with
    PYTHONPATH set as a caller's own.  (database, the resumed run's result, its progress calls, what each
    popen worker mapped while it ran, os.environ before and after it, (the killed child's exit status,
    its records file as the kill left it)).

    8 trials on 5 tasks run in rounds of 2: killed once 3 are recorded (after the second round), the run is
    unfinished, and the resumed one tunes only the rest, in rounds of 1."""
    root = tmp_path_factory.mktemp("tuning")
    db, trials = host_db(root), 8
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(TESTS), root=str(db.root),
                                                                   threads=THREADS, trials=trials)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while db.record_count() < 3 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    killed = (child.returncode, (db.path / tt.RECORDS).read_bytes())
    calls, workers = [], {}

    def progress(stage, done, total):
        calls.append((stage, done, total))
        workers.update(_popen_workers())

    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(root / "theirs"))
        before = dict(os.environ)
        result = tt.tune(tiny(), resolve_target("cpu"), trials=trials, db=db, threads=THREADS, progress=progress)
        after = dict(os.environ)
    return db, result, calls, workers, (before, after), killed


def test_host_target_names_the_cpu_and_its_vector_features():
    from tvm.target import codegen

    target = tt.tuning_target(resolve_target("cpu"), 3)
    assert target["kind"] == "llvm" and target["num-cores"] == 3
    assert target["mcpu"] == codegen.llvm_get_system_cpu()
    flags = _host_cpu_flags()
    if "avx512f" in flags:
        assert "+avx512f" in target["mattr"]
    if "avx512_vnni" in flags:
        assert "+avx512vnni" in target["mattr"]
    if "avx2" in flags:
        assert "+avx2" in target["mattr"]
    assert not any(f"+{f}" in target.get("mattr", ()) for f in ("avx512f", "avx2") if f not in flags)


def test_board_target_uses_its_cpu_and_cores_not_this_hosts():
    target = tt.tuning_target(resolve_target("rpi5"), 2)
    assert target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                      "mattr": ["+neon"], "num-cores": 4}
    with pytest.raises(ConfigError, match="microcontroller"):
        tt.tuning_target(resolve_target("cortex-m7"), 2)
    with pytest.raises(ConfigError, match="threads"):
        tt.tuning_target(resolve_target("cpu"), 0)


def test_tune_records_trials_and_reports_them(tuned):
    db, result, calls, *_ = tuned
    assert result.tasks == 5 and 0 < result.tuned_tasks <= 5
    assert result.trials_in_db == 8 == db.record_count()  # exactly --trials, after the killed run's share
    assert result.db_path == db.path and db.path.parent.parent == db.root
    assert len(result.best_ms) == result.tuned_tasks
    assert any("conv2d" in name for name in result.best_ms) or result.tuned_tasks < 5
    assert all(0 < ms < 100 for ms in result.best_ms.values())
    assert result.stopped is None
    assert calls[0] == ("extracting tasks", 0, 0) and calls[-1][1:] == (result.trials_run, result.trials_run)
    meta = json.loads((db.path / tt.META).read_text())
    assert meta["model_sha256"] == db.model_sha256 and meta["target"] == db.target
    assert meta["trials"] == result.trials_in_db and meta["seconds"] > 0
    assert sorted(p.name for p in db.path.iterdir()) == [tt.LOCK, tt.RECORDS, tt.WORKLOADS, tt.META]
    for folder in (db.path, db.path.parent):
        assert folder.stat().st_mode & 0o777 == 0o700


def test_tuning_workers_start_without_torch_and_the_environment_is_as_before(tuned):
    """MetaSchedule's builder and runner workers are ``python -m tvm.exec.popen_worker`` with dlopt's
    environment: each one's ``import tvm`` took torch in (3.4 CPU-s a worker start with it, 1.4 without).
    While the shared tune ran, every worker had TVM mapped and no torch; os.environ is as before it."""
    _, result, _, workers, (before, after), _ = tuned
    assert result.trials_run > 0
    assert len(workers) >= 2, workers.keys()  # a builder worker and the runner's
    assert all("libtvm" in maps for maps in workers.values())
    with_torch = [pid for pid, maps in workers.items() if f"{os.sep}torch{os.sep}" in maps]
    assert with_torch == [], f"{len(with_torch)} of {len(workers)} workers imported torch"
    assert after == before and before["PYTHONPATH"].endswith("theirs")


def test_tuned_build_applies_records_and_matches_onnxruntime(tuned):
    import tvm
    from tvm import relax

    from dlopt.targets.tvm import backend

    db, result, *_ = tuned
    model = tiny()
    mod = backend.relax_module(model, backend.input_specs(model))
    applied, tuned_tasks, tasks = tt.apply_database(mod, db.target, db)
    assert tasks == 5 and tuned_tasks == result.tuned_tasks > 0
    scheduled = [gv.name_hint for gv, f in applied.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get("tirx.is_scheduled")]
    assert len(scheduled) >= tuned_tasks
    target = tvm.target.Target(db.target)
    vm = relax.VirtualMachine(relax.build(applied, target=target, relax_pipeline=tt.lowering_pipeline(target)),
                              tvm.cpu())
    for seed in range(3):
        feed = random_feed(model, seed)
        got = vm["main"](tvm.runtime.tensor(feed["x"])).numpy()
        np.testing.assert_allclose(got, run_ort(model, feed)[0], rtol=1e-4, atol=1e-4)


def test_second_tune_with_the_same_trials_runs_none(tuned):
    db, first, *_ = tuned
    before = (db.path / tt.RECORDS).read_bytes()
    again = tt.tune(tiny(), resolve_target("cpu"), trials=8, db=db, threads=THREADS)
    assert again.trials_run == 0 and again.trials_in_db == first.trials_in_db
    assert (db.path / tt.RECORDS).read_bytes() == before
    assert again.tuned_tasks == first.tuned_tasks


def test_another_target_is_another_folder_with_no_records(tuned):
    """MetaSchedule matches records by kernel only (apache/tvm #15549): one folder per target."""
    from dlopt.targets.tvm import backend

    db, *_ = tuned
    for other in (tt.tuning_target(resolve_target("rpi5"), THREADS), {**db.target, "num-cores": OTHER}):
        elsewhere = tt.TuningDatabase(db.root, db.model_sha256, other)
        assert elsewhere.path.parent == db.path.parent and elsewhere.path != db.path
        model = tiny()
        mod = backend.relax_module(model, backend.input_specs(model))
        _, tuned_tasks, tasks = tt.apply_database(mod, db.target, elsewhere)
        assert (tuned_tasks, tasks) == (0, 5)
    assert host_db(db.root, threads=OTHER).path != db.path


_CHILD = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored
sys.path.insert(0, {tests!r})
from pathlib import Path
import models, onnx_ir as ir
from dlopt.core.profiles import resolve_target
from dlopt.targets.tvm import tuning as tt
model = ir.serde.deserialize_model(models.conv_bn_relu(channels=8, size=16))
profile = resolve_target("cpu")
db = tt.TuningDatabase(Path({root!r}), tt.model_digest(model), tt.tuning_target(profile, {threads}))
tt.tune(model, profile, trials={trials}, db=db, threads={threads})
print("finished", flush=True)
"""


def test_run_killed_with_sigkill_resumes_from_its_records(tuned):
    db, resumed, _, _, _, (returncode, kept) = tuned
    trials = 8
    assert returncode == -signal.SIGKILL
    recorded = kept.count(b"\n")
    assert 3 <= recorded < trials
    assert resumed.trials_in_db == db.record_count() >= trials
    now = (db.path / tt.RECORDS).read_bytes()
    assert now.startswith(kept[:kept.rfind(b"\n") + 1])  # the killed run's records are all still there
    assert trials - recorded <= resumed.trials_run < trials  # fewer new trials than a fresh run
    assert resumed.trials_in_db == recorded + resumed.trials_run


def test_sigint_stops_the_run_and_keeps_its_trials(tmp_path):
    # 10 trials in rounds of 2: the signal comes after the first round, with 4 rounds still to run, so the
    # run is still going when it arrives (48 made a first round of 10 builds before the signal could come)
    db, trials = host_db(tmp_path / "db"), 10
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(TESTS), root=str(db.root),
                                                                   threads=THREADS, trials=trials)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while db.record_count() < 2 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGINT and err.rstrip().endswith("KeyboardInterrupt"), err[-2000:]
    assert "CompileError" not in err
    recorded = db.record_count()
    assert 2 <= recorded < trials and db.meta()["trials"] == recorded
    with db.writing() as database:  # the lock went with the process
        assert len(database) == recorded


def test_torn_last_line_is_dropped_when_writing_and_skipped_when_reading(tuned, tmp_path, caplog):
    import shutil

    db, result, *_ = tuned
    copy = tt.TuningDatabase(tmp_path / "copy", db.model_sha256, db.target)
    copy.path.parent.mkdir(mode=0o700, parents=True)
    shutil.copytree(db.path, copy.path)
    records = copy.path / tt.RECORDS
    whole = records.read_bytes()
    records.write_bytes(whole + whole.splitlines(keepends=True)[-1][:40])  # a line cut by SIGKILL
    assert len(copy.snapshot()) == result.trials_in_db  # read-only: skipped, the file untouched
    assert records.read_bytes() != whole
    with caplog.at_level(logging.WARNING, logger="dlopt.targets.tvm.tuning"), copy.writing() as database:
        assert len(database) == result.trials_in_db
    assert records.read_bytes() == whole
    assert "unfinished last line" in caplog.text and "40 bytes" in caplog.text


def test_unsafe_or_foreign_folders_are_refused_and_left_alone(tmp_path):
    db = host_db(tmp_path / "a")
    db.path.parent.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    db.path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="symlink"), db.writing():
        pass
    assert list((tmp_path / "elsewhere").iterdir()) == []

    foreign = host_db(tmp_path / "b")
    foreign.path.mkdir(parents=True, mode=0o700)
    (foreign.path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a dlopt tuning database"), foreign.writing():
        pass
    assert sorted(p.name for p in foreign.path.iterdir()) == ["notes.txt"]

    shared = host_db(tmp_path / "c")
    shared.root.mkdir(mode=0o777)
    os.chmod(shared.root, 0o777)
    with pytest.raises(ConfigError, match="writable by group or others"), shared.writing():
        pass


def test_bad_arguments_are_one_line_config_errors(tmp_path):
    db, profile = host_db(tmp_path), resolve_target("cpu")
    with pytest.raises(ConfigError, match="trials"):
        tt.tune(tiny(), profile, trials=0, db=db, threads=THREADS)
    with pytest.raises(ConfigError, match="time budget"):
        tt.tune(tiny(), profile, trials=4, time_budget_s=0, db=db, threads=THREADS)
    with pytest.raises(ConfigError, match="not cpu's"):
        tt.tune(tiny(), profile, trials=4, db=db, threads=OTHER)
    with pytest.raises(ConfigError, match="another model"):
        tt.tune(models.conv_bn_relu(channels=4, size=16), profile, trials=4, db=db, threads=THREADS)
    with pytest.raises(ConfigError, match="cannot be measured on this machine"):
        rpi5 = resolve_target("rpi5")
        tt.tune(tiny(), rpi5, trials=4, threads=THREADS,
                db=tt.TuningDatabase(tmp_path, db.model_sha256, tt.tuning_target(rpi5, THREADS)))
    with pytest.raises(ConfigError, match="sha256"):
        tt.TuningDatabase(tmp_path, "abc", db.target)
    assert not any(tmp_path.iterdir())  # nothing was created for a refused run


def test_time_budget_stops_between_rounds_and_says_so(tuned, tmp_path):
    db = host_db(tmp_path)
    result = tt.tune(tiny(), resolve_target("cpu"), trials=200, time_budget_s=0.5, db=db, threads=THREADS)
    assert result.stopped == "stopped at the time budget of 0.5 s"
    assert result.trials_run == 0 == db.record_count()
    assert result.trials_run < 200


def test_meta_schedule_imports_the_tensor_intrinsics_and_leaves_inspect_as_it_was():
    """A fresh process: ``meta_schedule()`` registers the intrinsics a TuneContext needs (3 s, not 44)."""
    code = ("import inspect\nfrom dlopt.targets.tvm.tuning import meta_schedule\nstack = inspect.stack\n"
            "ms = meta_schedule()\nfrom tvm import s_tir\nfrom tvm.s_tir.tensor_intrin import x86\n"
            "assert inspect.stack is stack and ms.TuneContext\n"
            "print(s_tir.TensorIntrin.get(x86.VNNI_DOT_16x4_INTRIN) is not None)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
