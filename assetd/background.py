"""State of the daemon's long-lived background tasks: pin flush, housekeeping, recovery, watcher.

A background task must never die silently. Each one reports every outcome
here: a failure is logged (the first of a run at error level, repeats at
warning level with their count) and gives the delay before the next try,
doubling up to a cap; the first success after failures is logged too. The
state is what ``stats`` shows under ``background`` and what the metrics
export as ``assetd_background_ok``.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from assetd.log import get_logger

__all__ = ["Background", "TaskState"]

log = get_logger("assetd.background")


@dataclass
class TaskState:
    ok: bool | None = None  # None: not run yet
    last_ok: float | None = None  # wall-clock time of the last success
    last_error: str | None = None
    failures: int = 0  # consecutive; 0 once it succeeds again
    total_failures: int = 0


class Background:
    """Outcomes of the background tasks, shared by the loop and its worker threads."""

    def __init__(self, *, base_delay_s: float = 1.0, max_delay_s: float = 30.0) -> None:
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskState] = {}

    def ok(self, task: str) -> bool:
        """Record a success; True if it ends a run of failures."""
        with self._lock:
            state = self._tasks.setdefault(task, TaskState())
            recovered = state.failures > 0
            state.ok, state.last_ok, state.failures = True, time.time(), 0
        if recovered:
            log.info("background task recovered", task=task)
        return recovered

    def failed(self, task: str, exc: BaseException) -> float:
        """Record a failure and log it; the seconds to wait before trying again."""
        error = f"{type(exc).__name__}: {exc}"[:500]
        with self._lock:
            state = self._tasks.setdefault(task, TaskState())
            state.ok, state.last_error = False, error
            state.failures += 1
            state.total_failures += 1
            n = state.failures
        delay = min(self.max_delay_s, self.base_delay_s * float(2 ** min(n - 1, 16)))
        delay *= random.uniform(0.8, 1.0)  # noqa: S311  (jitter, not crypto)
        if n == 1:
            log.error("background task failed; retrying", task=task, error=error)
        else:
            log.warning(
                "background task still failing", task=task, error=error, failures=n, retry_s=delay
            )
        return delay

    def state(self, task: str) -> TaskState:
        with self._lock:
            return TaskState(**asdict(self._tasks.get(task, TaskState())))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {name: asdict(state) for name, state in sorted(self._tasks.items())}
