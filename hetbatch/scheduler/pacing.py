"""How far ahead a worker keeps work, and how often the coordinator and workers act.

Written once: the worker loop and the coordinator pace themselves by it, and the simulator
imitates them by the very same object, so that its predictions stay in step with real runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pacing:
    # Units a worker holds at once. The window of unsubmitted rows is what paces its lease
    # requests; this cap only bounds memory. It is well above three because a small unit whose
    # one long request is still decoding must not keep the engine from being fed.
    max_units: int = 16
    # A worker asks for its next unit once fewer than this many batches of rows wait to enter
    # its engine (and never keeps fewer than `min_window_rows`).
    window_batches: int = 2
    min_window_rows: int = 8
    wait_s: float = 0.25  # the shortest wait the scheduler tells a worker given nothing
    expire_tick_s: float = 0.5  # how often the coordinator expires lapsed leases
    idle_s: float = 0.02  # how long a worker with nothing to feed or step sleeps

    def window(self, concurrency: int) -> int:
        """Unsubmitted rows a worker keeps queued for an engine running `concurrency` requests."""
        return max(self.window_batches * concurrency, self.min_window_rows)


PACING = Pacing()
