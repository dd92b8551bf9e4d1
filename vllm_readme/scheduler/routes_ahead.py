# SPDX-License-Identifier: Apache-2.0
"""Routes ahead: a copy of the checkpoint's router next to the scheduler.

Read-ME's router reads token ids only, so the scheduler can know a token's
expert before any step runs it (paper §4.2, "pre-gating"). This module keeps
one small incremental state per request:

* when a request is added, its prompt joins a backlog of tokens not routed
  yet; the backlog is routed oldest request first, at most a given number
  of tokens per scheduler step, in chunks of ``chunk`` tokens that attend
  to the previous ``window`` positions: memory per chunk is ``chunk x
  (window + chunk)`` scores whatever the prompt's length, and a burst of
  long prompts delays no decode by more than one budget of router work;
* each newly sampled token takes one router step against that request's key
  and value cache (one query per request, batched over requests);
* the cache holds the last ``window`` positions only (a ring per request in
  one preallocated pool), so memory is bounded: ``slots x layers x 2 x
  window x kv_width`` floats. Every token attends to the ``window``
  positions up to itself, so routes equal the model's while a sequence is
  within ``window`` tokens; beyond it a route may differ (measured
  agreement: docs/scheduling.md).

The model keeps computing its own routes: outputs never depend on this copy,
only the order in which requests run does.

A copy, ``route_source: "router"``, against the model's own routes handed
back after each step (``"model"``, the default; model_routes.py): the route
of a token needs that token, which exists only after sampling, so the
model's routes are one token late, while the copy knows the route of the
token about to run. The copy costs one tiny transformer step per running
request per engine step, in the scheduler's process, which is why it is
not the default (benchmarks/routes_ahead.py times it; docs/scheduling.md
has its share of a served step).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_readme.configuration_readme import RouterConfig
from vllm_readme.modeling_readme import ReadMERouter


def load_router(model_dir: str | Path) -> ReadMERouter:
    """The router of a Read-ME checkpoint folder (config.json + safetensors)."""
    from safetensors import safe_open

    from vllm_readme.configuration_readme import ReadMEConfig

    folder = Path(model_dir)
    router = ReadMERouter(ReadMEConfig.from_pretrained(folder).router_config)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                if name.startswith("router."):
                    state[name.removeprefix("router.")] = f.get_tensor(name).float()
    missing, unexpected = router.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(f"{folder}: router weights missing {missing[:3]} / unexpected {unexpected[:3]}")
    return router.float().eval()


class RouteTracker:
    """Per-request routes of every token so far, extended as tokens arrive."""

    def __init__(self, router: ReadMERouter, window: int = 64, initial_slots: int = 64, chunk: int = 128):
        self.router = router.eval()
        cfg: RouterConfig = router.layers[0].self_attn.config if router.layers else None
        self.config = cfg
        self.window = window
        self.chunk = chunk
        self.num_layers = len(router.layers)
        self.kv_heads = cfg.num_key_value_heads
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.routes: dict[str, list[int]] = {}
        # Tokens received but not routed yet, per request (oldest added first).
        self.backlog: dict[str, list[int]] = {}
        self._slot: dict[str, int] = {}
        self._free: list[int] = []
        # Per layer, [slots, kv_heads, window, head_dim]: a step gathers its
        # requests' rows with index_select: each row is contiguous, so a
        # gather copies whole rows, where advanced indexing through one
        # [slots, layers, ...] tensor is slower.
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._slots = 0
        self._grow(initial_slots)

    # -- bookkeeping -------------------------------------------------------
    def _grow(self, slots: int) -> None:
        shape = (slots, self.kv_heads, self.window, self.head_dim)
        old = self._slots
        for pools in (self._keys, self._values):
            for layer in range(self.num_layers):
                grown = torch.zeros(shape)
                if old:
                    grown[:old] = pools[layer]
                if layer < len(pools):
                    pools[layer] = grown
                else:
                    pools.append(grown)
        self._slots = slots
        self._free.extend(range(slots - 1, old - 1, -1))

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.routes

    def __len__(self) -> int:
        return len(self.routes)

    def known(self, request_id: str) -> int | None:
        """Tokens received for the request, routed or not (None: unknown request)."""
        routes = self.routes.get(request_id)
        return None if routes is None else len(routes) + len(self.backlog.get(request_id, ()))

    def release(self, request_id: str) -> None:
        self.routes.pop(request_id, None)
        self.backlog.pop(request_id, None)
        slot = self._slot.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    # -- routing -----------------------------------------------------------
    def add(self, request_id: str, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Takes a prompt and routes up to ``max_tokens`` of it now (all of it
        by default); the rest waits for ``route_backlog``. Returns the routes
        known so far."""
        if request_id in self.routes:
            self.release(request_id)
        if not self._free:
            self._grow(2 * self._slots)
        self._slot[request_id] = self._free.pop()
        self.routes[request_id] = []
        if token_ids:
            self.backlog[request_id] = list(token_ids)
            self.route_backlog(max_tokens, request_ids=[request_id])
        return self.routes[request_id]

    def route_backlog(self, max_tokens: int | None = None, request_ids: list[str] | None = None) -> int:
        """Routes up to ``max_tokens`` backlogged tokens (None: all), oldest
        request first; returns how many it routed."""
        routed = 0
        for request_id in list(self.backlog if request_ids is None else request_ids):
            pending = self.backlog.get(request_id)
            while pending and (max_tokens is None or routed < max_tokens):
                n = min(self.chunk, len(pending), len(pending) if max_tokens is None else max_tokens - routed)
                self._route_chunk(request_id, pending[:n])
                del pending[:n]
                routed += n
            if not pending:
                self.backlog.pop(request_id, None)
            if max_tokens is not None and routed >= max_tokens:
                break
        return routed

    @torch.inference_mode()
    def _route_chunk(self, request_id: str, token_ids: list[int]) -> None:
        """Routes consecutive tokens of one request: each attends to the
        ``window`` positions up to itself (the ring's earlier ones and the
        chunk's own), as a decode step does."""
        r = self.router
        slot = self._slot[request_id]
        start = len(self.routes[request_id])
        count = len(token_ids)
        past = min(start, self.window - 1)  # earlier positions some query of the chunk can see
        positions = torch.arange(start, start + count)
        distance = positions[:, None] - torch.arange(start - past, start + count)[None]
        bias = torch.zeros(count, past + count).masked_fill((distance < 0) | (distance >= self.window), float("-inf"))
        past_ring = torch.arange(start - past, start) % self.window
        kept = min(count, self.window)  # the chunk's last positions stay in the ring
        ring = positions[count - kept :] % self.window
        x = r.embed_tokens(torch.tensor([token_ids]))
        cos, sin = r.rotary_emb(x, positions[None])
        for layer_index, layer in enumerate(r.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(attn, h, cos, sin)  # [1, heads|kv_heads, count, d]
            keys, values = self._keys[layer_index][slot], self._values[layer_index][slot]  # [kv_heads, window, d]
            # Read the earlier positions before the chunk's own overwrite their ring entries.
            all_keys = self._expand(torch.cat([keys[:, past_ring][None], k], dim=2))
            all_values = self._expand(torch.cat([values[:, past_ring][None], v], dim=2))
            keys[:, ring] = k[0, :, count - kept :]
            values[:, ring] = v[0, :, count - kept :]
            scores = (q @ all_keys.transpose(-1, -2)) * self.config.scale + bias
            out = scores.softmax(-1) @ all_values
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, count, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.routes[request_id].extend(r.expert_head(r.norm(x)).argmax(-1)[0].tolist())

    @torch.inference_mode()
    def extend(self, new_tokens: dict[str, list[int]]) -> None:
        """Route newly arrived tokens; one batched router step per token
        position, all requests with a token at that position together. A
        request with a backlog queues them behind it."""
        pending = {}
        for rid, tokens in new_tokens.items():
            if not tokens or rid not in self.routes:
                continue
            if rid in self.backlog:
                self.backlog[rid].extend(tokens)
            else:
                pending[rid] = list(tokens)
        while pending:
            batch = list(pending)
            token = torch.tensor([pending[rid].pop(0) for rid in batch])
            self._step(batch, token)
            pending = {rid: rest for rid, rest in pending.items() if rest}

    def _step(self, request_ids: list[str], token: torch.Tensor) -> None:
        r = self.router
        n = len(request_ids)
        slots = torch.tensor([self._slot[rid] for rid in request_ids])
        lengths = torch.tensor([len(self.routes[rid]) for rid in request_ids])  # position of the new token
        x = r.embed_tokens(token)[:, None]  # [n, 1, H]
        cos, sin = r.rotary_emb(x, lengths[:, None])
        ring = lengths % self.window
        # Valid ring entries after this token is written: min(length + 1, window).
        valid = torch.arange(self.window)[None] < (lengths + 1).clamp(max=self.window)[:, None]
        bias = torch.zeros(n, 1, 1, self.window).masked_fill(~valid[:, None, None], float("-inf"))
        for layer_index, layer in enumerate(r.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(attn, h, cos, sin)  # q [n, heads, 1, d], k/v [n, kv_heads, 1, d]
            self._keys[layer_index][slots, :, ring] = k[:, :, 0]
            self._values[layer_index][slots, :, ring] = v[:, :, 0]
            keys = self._expand(self._keys[layer_index].index_select(0, slots))  # [n, heads, window, d]
            values = self._expand(self._values[layer_index].index_select(0, slots))
            scores = (q @ keys.transpose(-1, -2)) * self.config.scale + bias
            out = scores.softmax(-1) @ values
            x = x + attn.o_proj(out.transpose(1, 2).reshape(n, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        routes = r.expert_head(r.norm(x))[:, 0].argmax(-1).tolist()
        for rid, route in zip(request_ids, routes, strict=True):
            self.routes[rid].append(route)

    def _qkv(self, attn, h, cos, sin):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        shape = (*h.shape[:-1], -1, self.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _expand(self, kv: torch.Tensor) -> torch.Tensor:
        groups = self.heads // self.kv_heads
        return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)
