# SPDX-License-Identifier: Apache-2.0
"""The model's own routes, handed to the expert-aware scheduler.

With ``route_source: "model"`` (options.py) the scheduler runs no router of
its own: after every forward this observer publishes the route the model
computed for the last token of each sequence, keyed by the KV-cache slot
that token was written to (``slot_mapping`` of the step's attention
metadata), through the plan file the scheduler owns (experts/plan.py). The
scheduler knows each request's block table, so it can tell whose route a
slot carries without request ids crossing processes. It then predicts a
request's next token to take the same expert (route persistence), one token
late but at no cost per step (docs/scheduling.md, "Routes ahead").

Outputs never depend on this: the model computes its own routes every step.
"""

from __future__ import annotations

import time

import torch
from vllm.logger import init_logger

from vllm_readme.experts.plan import ROUTES_READER, PlanReader
from vllm_readme.vllm_internals import attention_metadata, kv_slots_and_query_starts

logger = init_logger(f"vllm.{__name__}")

# The backbone's first attention layer: its metadata holds the slots the
# scheduler computes from its block tables (ReadMEAttention's prefix).
ANCHOR_LAYER = "model.layers.0.self_attn.attn"
MAX_PUBLISHED_EXPERTS = 256  # a route travels as one byte


class RoutePublisher:
    """A route observer (ReadMEForCausalLM.route_observers)."""

    def __init__(self, num_experts: int, engine_id: str, layer: str = ANCHOR_LAYER):
        self.plan = PlanReader(num_experts, engine_id, role=ROUTES_READER)
        self.layer = layer
        self.published = 0
        self._looked = float("-inf")  # when the scheduler's file was last looked for and not found
        self.broken = False
        self._warned = False

    def __call__(self, positions: torch.Tensor, expert_ids: torch.Tensor) -> None:
        if self.broken:
            return
        try:
            self._publish(positions, expert_ids)
        except Exception:  # routes only order requests: never stop a forward for them
            logger.exception("Read-ME: publishing routes to the scheduler failed; it runs without them from now on.")
            self.broken = True

    def _publish(self, positions: torch.Tensor, expert_ids: torch.Tensor) -> None:
        if expert_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # CUDA graph capture: no host copies (decode graphs replay without this observer: eager only)
        metadata = self._metadata()
        if metadata is None:
            return  # a profiling or warm-up run: no requests behind it
        slot_mapping, query_start_loc = metadata
        if self.plan.buf is None:
            # No expert-aware scheduler (yet: the engine builds it after the
            # workers and their warm-up): look again at most once a second,
            # not on every forward.
            now = time.monotonic()
            if now - self._looked < 1.0:
                return
            self._looked = now
            if not self.plan.attach():
                return
        last = query_start_loc[1:].long() - 1
        last = last[last >= 0]
        slots = slot_mapping[last].long()
        keep = slots >= 0  # padding (CUDA graphs) carries slot -1
        # One [3, n] int64 table, one host copy (a small one on a GPU).
        table = torch.stack([slots, positions[last].long(), expert_ids[last].long()])[:, keep].cpu().numpy()
        if self.plan.publish_routes(
            table[0].astype("<i8").tobytes(), table[1].astype("<i4").tobytes(), table[2].astype("u1").tobytes()
        ):
            if not self.published:
                logger.info("Read-ME: handing the model's routes to the expert-aware scheduler (route_source=model).")
            self.published += 1

    def _metadata(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(slot_mapping, query_start_loc) of this forward's anchor layer;
        None outside a forward and for micro-batches (not published)."""
        found = attention_metadata(self.layer)
        slots_and_starts = kv_slots_and_query_starts(found)
        if slots_and_starts is None:
            if found is not None and not self._warned:
                logger.warning(
                    "Read-ME: %s's attention metadata has no slot_mapping/query_start_loc; no routes for "
                    "the scheduler (route_source=router works without them).",
                    self.layer,
                )
                self._warned = True
            return None
        return slots_and_starts
