"""Progress bars that never garble what else is printed.

A bar is drawn only when enabled and stderr is a terminal: in a log file or a pipe, the
carriage returns it redraws with would glue every other line onto it. Lines reported while
a bar is drawn are printed above it (`report_above`).
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, drawn only when `enabled` and stderr is a terminal."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


def report_above(report):
    """`report`, printing its line above any bar being drawn rather than onto it."""

    def write(line: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            report(line)

    return write
