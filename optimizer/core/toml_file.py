"""The one TOML reader: dlopt.toml's [gate] and [targets] tables and sweep.toml all come through it."""

from __future__ import annotations

from pathlib import Path

from dlopt.core.errors import ConfigError, first_line


def read_toml(path: Path, what: str) -> dict:
    """``path`` parsed as TOML; a one-line ConfigError ``cannot read <what>: <why>`` when it cannot be
    (missing, unreadable, not UTF-8, not TOML, a number too long for Python or nesting too deep)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(f"reading {path.name} needs Python 3.11+ or `pip install tomli`") from None
    try:
        return tomllib.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"cannot read {what}: {first_line(exc)}") from exc
