"""--metrics-file in a shared node_exporter textfile folder: rewritten by each compile, never written
through a planted link, never over a file dlopt did not write."""

from __future__ import annotations

import os
import threading

import pytest
from click.testing import CliRunner

pytest.importorskip("prometheus_client", reason="metrics export needs prometheus-client "
                                                "(pip install 'dlopt[prometheus]')")

from cli import dlopt  # noqa: E402

from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.cli.package import package  # noqa: E402


def test_the_cli_rewrites_its_own_file(ort_output, tmp_path):
    """Acceptance: `dlopt package OUT --metrics-file m.prom` twice, as two processes (the first run
    never imports prometheus_client.parser, which _ours() needed and did not import: exit 70)."""
    out, report = ort_output
    first = dlopt("package", out, "--metrics-file", "m.prom", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    written = (tmp_path / "m.prom").stat()
    second = dlopt("package", out, "--metrics-file", "m.prom", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "metrics: m.prom" in second.stdout
    now = (tmp_path / "m.prom").stat()
    assert now.st_ino != written.st_ino  # replaced by a rename, not rewritten in place
    assert f'chosen_candidate="{report["chosen"]}"' in (tmp_path / "m.prom").read_text()
    assert oct(now.st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.prom"]  # no temporary file left


def test_someone_elses_file_is_refused_and_kept(ort_output, tmp_path):
    out, _ = ort_output
    theirs = tmp_path / "node.prom"
    theirs.write_text("# TYPE node_load1 gauge\nnode_load1 0.5\n")
    done = dlopt("package", out, "--metrics-file", theirs)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "holds metrics dlopt did not write" in line
    assert theirs.read_text() == "# TYPE node_load1 gauge\nnode_load1 0.5\n"


def test_planted_temporary_link_is_not_followed(ort_output, tmp_path):
    """prometheus-client wrote NAME.<pid>.<thread> with a plain open(): a link planted under that name
    in a shared textfile folder had its target overwritten."""
    out, _ = ort_output
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    shared = tmp_path / "textfile"
    shared.mkdir()
    path = shared / "dlopt.prom"
    planted = shared / f"dlopt.prom.{os.getpid()}.{threading.current_thread().ident}"
    planted.symlink_to(victim)
    result = CliRunner().invoke(package, [str(out), "--metrics-file", str(path)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert victim.read_text() == "precious\n"
    assert path.is_file() and not path.is_symlink() and "dlopt_latency_seconds" in path.read_text()
    assert planted.is_symlink()  # left as it was, not written through
    assert sorted(p.name for p in shared.iterdir()) == sorted(["dlopt.prom", planted.name])


def test_link_at_the_path_is_refused(ort_output, tmp_path):
    out, _ = ort_output
    victim = tmp_path / "victim.prom"
    victim.write_text("")
    (tmp_path / "m.prom").symlink_to(victim)
    result = CliRunner().invoke(package, [str(out), "--metrics-file", str(tmp_path / "m.prom")])
    assert isinstance(result.exception, ConfigError) and "is a link" in str(result.exception)
    assert victim.read_text() == ""
