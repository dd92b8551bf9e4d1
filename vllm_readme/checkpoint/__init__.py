# SPDX-License-Identifier: Apache-2.0
"""Making and checking Read-ME checkpoints (docs/design.md, "Checkpoint
format"): save, validate, build a tiny random one for tests, import the
authors' layout."""

from vllm_readme.checkpoint.io import load_readme_config, save_readme_checkpoint, validate_checkpoint

__all__ = ["load_readme_config", "save_readme_checkpoint", "validate_checkpoint"]
