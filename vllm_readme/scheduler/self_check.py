# SPDX-License-Identifier: Apache-2.0
"""Does holding requests back pay on this engine? Measured, by taking turns.

The policies decide one step at a time from a step-cost model. Whether that
wins over vLLM's order depends on more than one step: a request held back
still runs later, and with an expert pool smaller than a step's experts the
loads it seemed to save come back the next step (measured:
docs/scheduling.md, "With the expert cache"). So the scheduler checks its
own effect: steps are grouped in windows of ``window`` steps that take
turns between the configured policy and FCFS (vLLM's order, nothing held
back), and each window's throughput (tokens per second of engine time, its
first ``settle`` steps left out while the previous window's holds drain) is
compared with its neighbour's. Once ``pairs`` policy/FCFS pairs say that
the policy is slower by more than ``margin``, the scheduler runs FCFS and
tries the policy again for one window in every ``reprobe`` windows; while
the policy is not slower it keeps running, with an FCFS window in every
``reprobe`` to keep the comparison current.

Plain Python: no vLLM, no torch.
"""

from __future__ import annotations

import collections
import math


class SelfCheck:
    def __init__(self, window: int = 32, settle: int = 4, pairs: int = 3, margin: float = 0.02, reprobe: int = 8):
        if window <= settle:
            raise ValueError(f"a window ({window} steps) must be longer than its settling steps ({settle}).")
        self.window, self.settle, self.pairs, self.margin, self.reprobe = window, settle, pairs, margin, reprobe
        self.mode = "policy"  # what the current window runs: "policy" or "fcfs"
        self.policy_pays = True  # the standing verdict
        self.windows = 0  # windows completed
        self._step = 0  # steps into the current window
        self._tokens = 0
        self._seconds = 0.0
        self._last: dict[str, float] = {}  # mode -> tokens/s of its latest window
        self._previous: str | None = None  # mode of the latest measured window
        self.log_ratios: collections.deque[float] = collections.deque(maxlen=pairs)  # log(policy / fcfs)

    def uses_policy(self) -> bool:
        return self.mode == "policy"

    @property
    def ratio(self) -> float | None:
        """Measured throughput of the policy over FCFS (geometric mean of the
        latest pairs), or None before a pair is complete."""
        if not self.log_ratios:
            return None
        return math.exp(sum(self.log_ratios) / len(self.log_ratios))

    def record(self, tokens: int, seconds: float) -> None:
        """One finished engine step of the current window."""
        self._step += 1
        if self._step > self.settle:
            self._tokens += tokens
            self._seconds += seconds
        if self._step >= self.window:
            self._end_window()

    def _end_window(self) -> None:
        if self._seconds > 0 and self._tokens > 0:
            finished = self.mode
            self._last[finished] = self._tokens / self._seconds
            # A comparison per pair of neighbouring windows of different modes.
            if self._previous is not None and self._previous != finished and len(self._last) == 2:
                self.log_ratios.append(math.log(self._last["policy"] / self._last["fcfs"]))
            self._previous = finished
        if len(self.log_ratios) == self.pairs:
            self.policy_pays = self.ratio >= 1 - self.margin
        self.windows += 1
        self._step, self._tokens, self._seconds = 0, 0, 0.0
        self.mode = self._next_mode()

    def _next_mode(self) -> str:
        if len(self.log_ratios) < self.pairs:  # still measuring: alternate
            return "fcfs" if self.mode == "policy" else "policy"
        standing = "policy" if self.policy_pays else "fcfs"
        if self.windows % self.reprobe == 0:  # one window of the other, to keep the comparison current
            return "fcfs" if standing == "policy" else "policy"
        return standing
