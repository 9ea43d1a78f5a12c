"""dlopt.targets.tvm.rpc on a real TVM RPC tracker and servers on loopback: an x86 server, an aarch64
one under qemu-aarch64, and MetaSchedule's RPC runner measuring on the remote server."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")
pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")
pytest.importorskip("cloudpickle", reason="TVM's RPC server needs cloudpickle")

import models  # noqa: E402
from helpers import max_rel_error, run_ort  # noqa: E402
from rpc_servers import (HOST, free_port, local_rpc_server, qemu_rpc_server,  # noqa: E402,F401
                         rpc_tracker_address)

from dlopt.core.errors import ConfigError, DataError, TargetUnavailable  # noqa: E402
from dlopt.core.profiles import resolve_target  # noqa: E402
from dlopt.targets.tvm import backend  # noqa: E402
from dlopt.core.remote import RemoteDevice  # noqa: E402
from dlopt.targets.tvm.rpc import connect, ms_runner, remote_session, servers  # noqa: E402
from dlopt.measure.timing import Timing, time_interleaved  # noqa: E402

MODEL = models.conv_bn_relu(channels=8, size=16, batch="N")
CROSS = "aarch64-linux-gnu-gcc"
needs_cross = pytest.mark.skipif(shutil.which(CROSS) is None,
                                 reason=f"{CROSS} not installed (apt-get install gcc-aarch64-linux-gnu)")


def _x(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """profile name -> TVM artefact of MODEL (built for batch 1, served sample by sample)."""
    folder = tmp_path_factory.mktemp("tvm-libraries")
    built = {"cpu": backend.BACKEND.compile(ir.serde.deserialize_model(MODEL), resolve_target("cpu"), folder / "cpu",
                                    precision="fp32", threads=1)}
    if shutil.which(CROSS):
        built["rpi5"] = backend.BACKEND.compile(ir.serde.deserialize_model(MODEL), resolve_target("rpi5"), folder / "rpi5",
                                        precision="fp32", threads=1)
    return built


# --- (a) what a wrong address or key says --------------------------------------------------------

@pytest.mark.parametrize(("tracker", "key", "message"), [
    ("", "local", "RPC tracker '' is not HOST:PORT (e.g. 127.0.0.1:9190)"),
    ("localhost", "local", "RPC tracker 'localhost' is not HOST:PORT"),
    (":9190", "local", "RPC tracker ':9190' is not HOST:PORT"),
    ("127.0.0.1:", "local", "RPC tracker '127.0.0.1:' is not HOST:PORT"),
    ("127.0.0.1:http", "local", "RPC tracker '127.0.0.1:http': port 'http' is not a number from 1 to 65535"),
    ("127.0.0.1:70000", "local", "port '70000' is not a number from 1 to 65535"),
    ("127.0.0.1:0", "local", "port '0' is not a number from 1 to 65535"),
    ("::1:9190", "local", "write an IPv6 address in brackets ([::1]:9190)"),
    ("127.0.0.1:9190", "", "RPC key '' must be letters, digits"),
    ("127.0.0.1:9190", "my board", "RPC key 'my board' must be"),
    ("127.0.0.1:9190", "server:rpi5", "RPC key 'server:rpi5' must be"),
])
def test_bad_tracker_or_key_is_a_one_line_config_error(tracker, key, message):
    with pytest.raises(ConfigError) as raised:
        RemoteDevice.parse(tracker, key)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_parse_accepts_host_port_and_bracketed_ipv6():
    assert RemoteDevice.parse(" 10.0.0.7:9190 ", "rpi5") == RemoteDevice("10.0.0.7", 9190, "rpi5")
    device = RemoteDevice.parse("[::1]:9190", "jetson-orin_2")
    assert (device.host, device.port, device.tracker) == ("::1", 9190, "[::1]:9190")
    assert str(RemoteDevice.parse("farm.lan:9190", "rpi5")) == "rpi5 via RPC tracker farm.lan:9190"


def test_unreachable_tracker_says_how_to_start_one():
    port = free_port()  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(TargetUnavailable) as raised:
        connect(RemoteDevice(HOST, port, "rpi5"), timeout=5)
    assert str(raised.value) == (f"cannot reach the RPC tracker at {HOST}:{port} (Connection refused); start one "
                                 f"with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port} --port-end {port + 1}` or check "
                                 f"--rpc-tracker")
    assert time.perf_counter() - started < 5  # no retrying for a minute as TVM's own client does


def test_something_else_listening_is_not_taken_for_a_tracker():
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(1)

        def answer_http():
            conn, _ = listener.accept()
            with conn:
                conn.recv(4)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer_http, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        with pytest.raises(TargetUnavailable, match=rf"^{HOST}:{port} is not a TVM RPC tracker "):
            servers(RemoteDevice(HOST, port, "rpi5"), timeout=5)
        thread.join(5)


def test_unknown_key_lists_the_keys_the_tracker_knows(local_rpc_server, rpc_tracker_address):
    device = RemoteDevice.parse(rpc_tracker_address, "rpi9")
    for call in (lambda: connect(device, timeout=10), lambda: ms_runner(device, timeout=10)):
        with pytest.raises(TargetUnavailable) as raised:
            call()
        message = str(raised.value)
        assert message.startswith(f"no RPC server with key 'rpi9' is registered with the tracker at "
                                  f"{rpc_tracker_address} (it knows local (1 server, ")
        assert message.endswith(f"start one on the device with `python -m tvm.exec.rpc_server --tracker "
                                f"{rpc_tracker_address} --key rpi9`")
        assert "\n" not in message


# --- (b) an x86 server on loopback ---------------------------------------------------------------

def test_remote_run_equals_the_local_session_and_times_on_the_device(local_rpc_server, libraries):
    artifact = libraries["cpu"]
    local = backend.BACKEND.load(artifact)
    with remote_session(local_rpc_server.device, artifact.entry_path, artifact.settings, timeout=30) as remote:
        assert remote.input_names == ["x"] and remote.threads == 1  # the build's threads setting
        for batch, seed in ((1, 0), (3, 1)):  # batch 3 runs sample by sample, as TvmSession does
            x = _x(batch, seed)
            (got,) = remote.run({"x": x})
            (want,) = local.run({"x": x})
            assert got.shape == want.shape == (batch, 10)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        feed = {"x": _x(1, 2)}
        timing = Timing.from_device(remote.time_ms(feed, runs=40, warmup=3), warmup=3, threads=remote.threads)
        assert isinstance(timing, Timing)
        assert (timing.runs, timing.warmup, timing.threads) == (40, 3, 1)
        assert 0 < timing.p50_ms <= timing.p90_ms <= timing.p99_ms
        assert timing.ci_low_ms <= timing.p50_ms <= timing.ci_high_ms
        round_trips = []
        for _ in range(20):
            start = time.perf_counter()
            remote.run(feed)
            round_trips.append((time.perf_counter() - start) * 1e3)
        # Measured on the device: none of the upload, RPC calls and download a remote run costs.
        assert timing.p50_ms < np.median(round_trips)
        with pytest.raises(DataError, match=r"^input 'x' has shape \[1, 3, 8, 8\]; this TVM library was built "
                                            r"for \[1, 3, 16, 16\]$"):
            remote.run({"x": np.zeros((1, 3, 8, 8), np.float32)})
        with pytest.raises(DataError, match=r"^missing input 'x'; the library takes x$"):
            remote.time_ms({}, runs=5, warmup=0)
        with pytest.raises(TargetUnavailable, match=rf"^all 1 RPC server\(s\) with key 'local' at "
                                                    rf"{HOST}:\d+ stayed busy for 1 s; try again later or add devices$"):
            connect(local_rpc_server.device, timeout=1)  # this session holds the only one
    with pytest.raises(ConfigError, match=r"^the remote session on local via RPC tracker .* is closed$"):
        remote.run(feed)
    local_timing = time_interleaved({"local": local.run}, feed, runs=40, warmup=3, threads=1)["local"]
    print(f"\ntiny conv model: remote (loopback, device-side) p50 {timing.p50_ms * 1e3:.1f} us, "
          f"remote run() round trip p50 {np.median(round_trips) * 1e3:.1f} us, "
          f"local TvmSession p50 {local_timing.p50_ms * 1e3:.1f} us; "
          f"server start-up {local_rpc_server.startup_s:.1f} s")
    _wait_free(local_rpc_server.device)  # closing ended the session: the server serves the next one


def test_a_session_dropped_without_close_frees_the_server(local_rpc_server, libraries):
    import gc

    artifact = libraries["cpu"]
    gc.disable()  # the session must end by reference counting alone, as when a runner lets it go
    try:
        remote = remote_session(local_rpc_server.device, artifact.entry_path, artifact.settings, timeout=30)
        remote.run({"x": _x(2, seed=3)})
        remote.time_ms({"x": _x(1, seed=3)}, runs=3, warmup=1)
        del remote
        _wait_free(local_rpc_server.device)
    finally:
        gc.enable()


@needs_cross
def test_an_aarch64_library_on_an_x86_server_is_a_one_line_error(local_rpc_server, libraries):
    artifact = libraries["rpi5"]
    with pytest.raises(TargetUnavailable) as raised:
        remote_session(local_rpc_server.device, artifact.entry_path, artifact.settings, timeout=30)
    message = str(raised.value)
    assert message.startswith("the RPC server 'local' could not load model.so (aarch64 shared library (NEON)): ")
    assert "\n" not in message
    _wait_free(local_rpc_server.device)


def _wait_free(device: RemoteDevice, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while servers(device, timeout=5)[device.key][1] < 1:
        assert time.monotonic() < deadline, f"the {device.key} server stayed busy after the session closed"
        time.sleep(0.2)


# --- (c) an aarch64 server under qemu-aarch64 ----------------------------------------------------

@needs_cross
def test_rpi5_library_runs_on_the_emulated_aarch64_server_like_onnxruntime(qemu_rpc_server, libraries):
    artifact = libraries["rpi5"]
    assert artifact.settings["form"] == "aarch64 shared library (NEON)" and not artifact.loadable_here
    with remote_session(qemu_rpc_server.device, artifact.entry_path, artifact.settings, timeout=60,
                        threads=1) as remote:
        assert remote.threads == 1
        x = _x(4, seed=7)
        (got,) = remote.run({"x": x})
        (want,) = run_ort(MODEL, {"x": x})
        assert got.shape == (4, 10)
        assert max_rel_error(want, got) <= 1e-4
        timing = Timing.from_device(remote.time_ms({"x": x[:1]}, runs=10, warmup=1), warmup=1, threads=remote.threads)
        assert timing.runs == 10 and timing.p50_ms > 0
    print(f"\nqemu-aarch64 server: start-up {qemu_rpc_server.startup_s:.1f} s, tiny conv model p50 "
          f"{timing.p50_ms * 1e3:.0f} us emulated, max rel error {max_rel_error(want, got):.1e}")


# --- (d) MetaSchedule's RPC runner ---------------------------------------------------------------

def _matmul(n: int = 64):
    from tvm import te

    a = te.placeholder((n, n), name="A")
    b = te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    return te.create_prim_func([a, b, c])


def test_ms_runner_measures_a_prebuilt_artefact_on_the_remote_server(local_rpc_server, tmp_path):
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import TensorInfo
    from tvm.s_tir.meta_schedule.runner import RPCRunner, RunnerInput

    library = tmp_path / "matmul_trial.so"
    tvm.compile(_matmul(), target="llvm").export_library(str(library))

    runner = ms_runner(local_rpc_server.device, number=2, repeat=3, min_repeat_ms=0, timeout=30)
    assert isinstance(runner, RPCRunner) and runner.rpc_config.tracker_key == "local"
    assert (runner.evaluator_config.number, runner.evaluator_config.repeat) == (2, 3)
    args = [TensorInfo("float32", [64, 64])] * 3
    (result,) = [f.result() for f in runner.run([RunnerInput(str(library), "cpu", args)])]
    assert result.error_msg is None
    seconds = [float(s) for s in result.run_secs]
    assert len(seconds) == 3 and all(0 < s < 1 for s in seconds)
    log = local_rpc_server.log.read_text()
    assert "load_module" in log and "matmul_trial.so" in log  # the server loaded it: measured there
    print(f"\nMetaSchedule RPC runner: 64x64 matmul {np.median(seconds) * 1e6:.0f} us on the remote server")


def _in_process_builder(folder):
    """A MetaSchedule builder linking each trial here into a ``.so`` in its own folder (MetaSchedule
    deletes the folder after the run): no worker pool importing TVM's tensor intrinsics per build."""
    import tempfile
    from pathlib import Path

    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for build_input in build_inputs:
                library = Path(tempfile.mkdtemp(prefix="trial-", dir=folder)) / "trial.so"
                try:
                    tvm.compile(build_input.mod, target=build_input.target).export_library(str(library))
                    results.append(BuilderResult(str(library), None))
                except Exception as exc:  # a candidate schedule TVM cannot build is a failed trial
                    results.append(BuilderResult(None, str(exc)))
            return results

    return InProcessBuilder()


def test_a_two_trial_metaschedule_tune_measures_on_the_remote_server(local_rpc_server, tmp_path):
    import tvm

    from dlopt.targets.tvm.tuning import meta_schedule

    ms = meta_schedule()
    loads_before = local_rpc_server.log.read_text().count("trial.so")
    started = time.perf_counter()
    database = ms.tune_tir(tvm.IRModule({"main": _matmul()}), tvm.target.Target({"kind": "llvm", "num-cores": 1}),
                           str(tmp_path / "work"), max_trials_global=2, num_trials_per_iter=2, seed=0,
                           # random traces: what is tested is the measuring over RPC, not the search
                           strategy="replay-trace",
                           builder=_in_process_builder(tmp_path),
                           runner=ms_runner(local_rpc_server.device, number=2, repeat=1, min_repeat_ms=0, timeout=30))
    seconds = [float(s) for record in database.get_all_tuning_records() for s in record.run_secs]
    assert len(seconds) == 2 and all(0 < s < 1 for s in seconds)  # failed trials record 1e10 s
    assert local_rpc_server.log.read_text().count("trial.so") - loads_before >= 2
    print(f"\n2-trial MetaSchedule tune over RPC: {time.perf_counter() - started:.1f} s, trials "
          f"{', '.join(f'{s * 1e6:.0f} us' for s in seconds)}")
