"""What a run prints: our own lines always, Flower's warnings and errors always, Flower's INFO
detail (strategy banners, every aggregated MetricRecord, the final-results dump) only when asked.

A 20-round ``make run`` streams ~800 lines of Flower INFO around the one progress line per round
that a person reads; :func:`keep` drops them unless ``verbose``. A traceback or any line without
Flower's level prefix is kept: it is ours, or the continuation of a warning or error.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable
from typing import TextIO

# Flower's console format: the level (possibly coloured), padding, a colon: "\x1b[92mINFO \x1b[0m:"
LEVEL = re.compile(r"^(?:\x1b\[[0-9;]*m)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*(?:\x1b\[0m)?\s*:")
QUIET_LEVELS = ("DEBUG", "INFO")
# Flower CLI / SuperExec chatter without a level prefix, shown only with ``verbose``
CHATTER = ("Using SuperLink:", "Successfully installed ")


def keep(line: str, verbose: bool = False) -> bool:
    """Whether ``line`` of a run's log is shown: everything with ``verbose``, else all but
    Flower's DEBUG and INFO records."""
    if verbose:
        return True
    if line.startswith(CHATTER):
        return False
    match = LEVEL.match(line)
    return match is None or match.group(1) not in QUIET_LEVELS


def filtered(lines: Iterable[str], verbose: bool = False) -> Iterable[str]:
    return (line for line in lines if keep(line, verbose))


def stream(cmd: list[str], env: dict[str, str], verbose: bool = False,
           out: TextIO | None = None) -> int:
    """Run ``cmd`` (``flwr log RUN --stream``) and copy its output through :func:`keep` to
    ``out`` (stdout) as it arrives; its exit code."""
    out = out or sys.stdout
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    try:
        for line in filtered(proc.stdout, verbose):
            out.write(line)
            out.flush()
    except BaseException:  # the launcher interrupted (SIGINT/SIGTERM): do not wait for the run
        proc.kill()
        raise
    finally:
        proc.stdout.close()
        code = proc.wait()
    return code
