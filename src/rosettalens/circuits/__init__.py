"""Circuits on Hugging Face models: sequence tasks, batched patching, attribution patching, ablation,
pruning, faithfulness and head roles (Lan, Torr, Barez 2024).

Each submodule adds its public names below.
"""

from __future__ import annotations

from .ablation import Ablator as Ablator
from .ablation import mean_ablate as mean_ablate
from .ablation import resample_ablate as resample_ablate
from .ablation import zero_ablate as zero_ablate
from .attribution import EdgeAttribution as EdgeAttribution
from .attribution import NodeAttribution as NodeAttribution
from .attribution import attribute_edges as attribute_edges
from .attribution import attribute_nodes as attribute_nodes
from .attribution import logit_diff_metric as logit_diff_metric
from .faithfulness import MIB_FRACTIONS as MIB_FRACTIONS
from .faithfulness import Circuit as Circuit
from .faithfulness import Faithfulness as Faithfulness
from .faithfulness import FaithfulnessCurve as FaithfulnessCurve
from .faithfulness import circuit_from_scores as circuit_from_scores
from .faithfulness import cmd as cmd
from .faithfulness import cpr as cpr
from .patching import SWEEPS as SWEEPS
from .patching import PatchResult as PatchResult
from .patching import patch_sweep as patch_sweep
