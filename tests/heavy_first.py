"""Heaviest test file first: the order `make test` hands test files to its pytest-xdist workers.

`--dist loadfile` keeps each file in one worker (its module fixtures are built once) and, by default, hands the
files out in order of their number of tests, so a 1-test file that runs for a minute could start last and leave
the other workers idle at the end.  tests/conftest.py swaps in ``HeaviestFileFirst``, which hands out the file
with the most seconds left in tests/file_seconds.json each time a worker needs work (longest processing time
first): the long files start at once and the short ones fill in behind them.  A file missing from the table
(a new one) counts as ``NEW_FILE_S``, a guess at the upper half.

The table is measured, not guessed: after a change that moves a file's time by much, refresh it with

    .venv/bin/python -m pytest -q -n 3 --dist loadfile --durations=0 tests > durations.log
    .venv/bin/python tests/heavy_first.py durations.log > tests/file_seconds.json

(the second line sums each file's setup, call and teardown seconds from the first one's slowest-durations list).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

TABLE = Path(__file__).with_name("file_seconds.json")
NEW_FILE_S = 20.0
# "12.34s call     tests/test_x.py::test_y[a-b]" in pytest's --durations list
_DURATION = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(\S+?)::")


def file_seconds(path: Path = TABLE) -> dict[str, float]:
    """{"tests/test_x.py": seconds} from the table; empty (collection order) when it is missing or unreadable."""
    try:
        table = json.loads(path.read_text())["seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(name): float(seconds) for name, seconds in table.items()}


def make_scheduler(config, log):
    """A ``HeaviestFileFirst`` for ``--dist loadfile``; None (xdist's own) for any other mode."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class HeaviestFileFirst(LoadFileScheduling):
        """xdist's LoadFileScheduling, but each work unit handed out is the heaviest file left.

        LoadFileScheduling gives a worker the unit at the front of its queue (``workqueue.popitem(last=False)``)
        when it starts, and again whenever the worker has 2 or fewer tests left; this moves the heaviest file
        left to the front just before that, so which file starts when follows the table."""

        def __init__(self, config, log=None, seconds: dict[str, float] | None = None) -> None:
            super().__init__(config, log)
            self.seconds = file_seconds() if seconds is None else seconds

        def weight(self, scope: str) -> float:
            return self.seconds.get(scope, NEW_FILE_S)

        def _assign_work_unit(self, node) -> None:
            heaviest = max(self.workqueue, key=self.weight)  # ties: the first in xdist's order
            self.workqueue.move_to_end(heaviest, last=False)
            super()._assign_work_unit(node)

    return HeaviestFileFirst(config, log)


def totals(lines) -> dict[str, float]:
    """Seconds per test file (setup + call + teardown) from a ``--durations=0`` listing."""
    seconds: dict[str, float] = defaultdict(float)
    for line in lines:
        match = _DURATION.match(line.strip())
        if match:
            seconds[match.group(3)] += float(match.group(1))
    return dict(seconds)


if __name__ == "__main__":
    measured = totals(Path(sys.argv[1]).read_text().splitlines())
    if not measured:
        sys.exit(f"{sys.argv[1]}: no --durations=0 lines (run pytest with --durations=0)")
    ordered = dict(sorted(((name, round(s, 1)) for name, s in measured.items()), key=lambda kv: (-kv[1], kv[0])))
    print(json.dumps({"about": "seconds per test file (setup + call + teardown) from a `make test` run with "
                               "--durations=0; read by tests/heavy_first.py, see there",
                      "seconds": ordered}, indent=1))
