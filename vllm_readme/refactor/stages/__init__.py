# SPDX-License-Identifier: Apache-2.0
"""The stages of a refactoring build, in the order pipeline.py runs them.

- ``inputs``: the dense model, the calibration text and the held-out blocks;
- ``activations``: statistics of every MLP's inner activation (shared
  between builds through ``--stats-cache``);
- ``experts``: the experts' and the shared part's channels;
- ``router``: the decoupled router, distilled from the dense model;
- ``tune``: expert tuning through the routed MLPs;
- ``evaluate``: perplexities, routing, the chat check and the report.

Each stage that keeps a result reads and writes it through the build's
``StageCache`` (cache.py), which forms its key.
"""


def log(message: str) -> None:
    print(f"[refactor] {message}", flush=True)
