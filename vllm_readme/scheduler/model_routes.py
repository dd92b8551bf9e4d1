# SPDX-License-Identifier: Apache-2.0
"""Routes ahead from the model itself (``route_source: "model"``).

The model publishes, after every forward, the route it computed for the
last token of each sequence, keyed by the KV-cache slot that token was
written to (model_executor/route_publisher.py, through experts/plan.py).
When the scheduler schedules a step it notes, for every request in it, the
slot its last token will be written to (from its own block tables); the
book matches published slots against those notes and keeps each request's
latest route. The policy then takes a decoding request's next token to
route where its last one did: one token late, right as often as the
model's route persistence P[route_t == route_t-1] (docs/scheduling.md), and
at no cost per step beyond a dictionary lookup per request.

Slots are unique within a step (each (request, position) owns its slot
while the step runs); a published route carries its position too, so a
slot freed and given to another request since cannot hand over a stranger's
route. Notes are kept for the last ``keep_steps`` steps so that an async
scheduler, which schedules a step before the previous one's routes arrive,
still matches them.

Plain Python: no vLLM, no torch.
"""

from __future__ import annotations

import collections


class ModelRouteBook:
    """Each request's latest route, as the model computed it."""

    def __init__(self, keep_steps: int = 3):
        self.latest: dict[str, tuple[int, int]] = {}  # request -> (position, expert) of its newest routed token
        self.expected: collections.deque[dict[int, tuple[str, int]]] = collections.deque(maxlen=keep_steps)
        self.live: set[str] = set()  # requests added and not yet released
        self.received = 0  # routes published by the model
        self.matched = 0  # of them, matched to a request
        # Of the matched routes whose previous position's route was known
        # (what the policy used as this token's route): how many equalled it.
        self.predicted = 0
        self.predicted_right = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.live

    def __len__(self) -> int:
        return len(self.live)

    def add(self, request_id: str) -> None:
        self.live.add(request_id)

    def expect(self, slots: dict[int, tuple[str, int]]) -> None:
        """slot -> (request, position) of each request's last token in the
        step just scheduled."""
        self.expected.append(slots)

    def receive(self, slots, positions, routes) -> int:
        """Published (slot, position, expert) triples; returns how many
        matched a note of the same slot and position."""
        matched = 0
        for slot, published_at, route in zip(slots, positions, routes, strict=False):
            self.received += 1
            for notes in reversed(self.expected):  # newest first
                note = notes.get(slot)
                if note is not None and note[1] == published_at:
                    del notes[slot]
                    request_id, position = note
                    newest = self.latest.get(request_id)
                    if request_id not in self.live:
                        pass  # finished while its last step ran
                    elif newest is None or newest[0] < position:
                        if newest is not None and newest[0] == position - 1:
                            self.predicted += 1
                            self.predicted_right += newest[1] == route
                        self.latest[request_id] = (position, route)
                    matched += 1
                    break
        self.matched += matched
        return matched

    def get(self, request_id: str) -> int | None:
        """The expert of the request's newest token the model has routed."""
        newest = self.latest.get(request_id)
        return None if newest is None else newest[1]

    def release(self, request_id: str) -> None:
        self.live.discard(request_id)
        self.latest.pop(request_id, None)
