"""The one error path of every entry point in launch/: a mistake of the user's (a bad config, data, evaluation
files or checkpoint), raised at any time on any rank, ends the process with one line on rank 0's stderr
naming the value and the fix, and exit code 2; the other ranks exit with the same code, quietly."""
from __future__ import annotations

import os
import sys
from typing import Callable

USAGE_ERROR = 2


def is_rank0() -> bool:
    """Rank 0 of the launcher's ranks (or the only process); readable before any process group starts."""
    return int(os.environ.get("RANK", "0")) == 0


def notice(message: str) -> None:
    """One line for the person at the terminal, from rank 0 only (stderr, beside any progress bar)."""
    if is_rank0():
        print(message, file=sys.stderr, flush=True)


def user_errors() -> dict[type, str]:
    """Exception type → the prefix of its line."""
    from degla_scale.checkpoint import CheckpointError
    from degla_scale.config import ConfigError
    from degla_scale.data.reader import DataError
    from degla_scale.eval.common import EvalDataError, EvalDependencyError
    from degla_scale.export import ExportError

    return {ConfigError: "config error", DataError: "data error", EvalDataError: "evaluation data error",
            ExportError: "export error", CheckpointError: "checkpoint error",
            EvalDependencyError: "missing evaluation dependency"}


STOPPED = 3  # training stopped itself (reliability.nonfinite=stop, evaluation.stop_on_drop), its checkpoint kept


def run(main: Callable[[], int]) -> int:
    """`main()`'s exit code, or 2 after one line for a user error (3 for a run that stopped itself)."""
    from degla_scale.reliability import RunStopped

    try:
        return main()
    except RunStopped as exc:
        notice(f"training stopped: {exc}")
        return STOPPED
    except Exception as exc:
        prefix = next((p for kind, p in user_errors().items() if isinstance(exc, kind)), None)
        if prefix is None:
            raise
        notice(f"{prefix}: {' '.join(str(exc).split())}")  # one line, whatever the message held
        return USAGE_ERROR
