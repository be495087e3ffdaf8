"""Circuits on Hugging Face models: sequence tasks, batched patching, attribution patching, ablation,
pruning, faithfulness and head roles (Lan, Torr, Barez 2024).

Each submodule adds its public names below.
"""

from __future__ import annotations
