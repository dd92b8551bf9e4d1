# SPDX-License-Identifier: Apache-2.0
"""Where expert weights live: a pool of expert slots, eviction, prefetch
(paper §4.3). Plain-Python algorithms here; the vLLM adapter binds them to
the model's slot_table."""
