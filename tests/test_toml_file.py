"""One TOML reader behind dlopt.toml's [gate] and [targets] and sweep.toml: the same one-line errors."""

from __future__ import annotations

import pytest

from dlopt.core.errors import ConfigError
from dlopt.report.gate import load_thresholds
from dlopt.core.profiles import load_user_profiles
from dlopt.workflows.sweep import load_sweep


@pytest.mark.parametrize("read, what", [(load_thresholds, "gate thresholds from"),
                                        (load_user_profiles, "targets from"), (load_sweep, "sweep")])
@pytest.mark.parametrize("content, why", [
    (b"[gate\n", "Expected ']' at the end of a table declaration (at line 1, column 6)"),
    (b"a = \xff\n", "'utf-8' codec can't decode byte 0xff in position 4: invalid start byte"),
    (b"a = " + b"9" * 5000 + b"\n", "Exceeds the limit (4300 digits) for integer string conversion"),
    (None, "No such file or directory"),
])
def test_unreadable_files_are_one_line_config_errors_naming_the_file(tmp_path, read, what, content, why):
    path = tmp_path / "conf.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        read(path)
    message = str(err.value)
    assert message.startswith(f"cannot read {what} {path}: ") and why in message and "\n" not in message
