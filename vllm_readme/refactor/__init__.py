# SPDX-License-Identifier: Apache-2.0
"""Refactoring a dense Llama-family LLM into a Read-ME MoE (paper §3).

Stages, each cached under ``OUT/.refactor/`` so an interrupted build resumes:

1. ``activations``: statistics of every MLP's inner activation (the input of
   ``down_proj``) over calibration text;
2. ``experts``: per-layer channel masks, one per expert (the paper's
   per-domain top-k recipe, or clustering when no domains are given); the
   channels every expert keeps form the shared part;
3. ``router``: the decoupled router, initialised from the backbone's token
   embedding and distilled to predict the expert whose mask best covers each
   token's active channels (paper Eq. 4, summed over layers);
4. ``tune`` (optional): the backbone fine-tuned through the routed MLPs with
   the LM loss, router frozen, bounded by a token budget;
5. ``evaluate``: perplexity of dense, MoE and a pruned dense model of the
   same active size, plus routing statistics.

Layout: ``options.py`` holds the build's options; ``cache.py`` forms every
stage's cache key and keeps the results in ``OUT/.refactor/``; ``stages/``
has one module a stage, the caching around the algorithms of the modules
here; ``pipeline.py`` runs the stages in order.

Nothing here imports vLLM.
"""
