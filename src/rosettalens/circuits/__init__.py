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
from .faithfulness import EdgeFaithfulness as EdgeFaithfulness
from .faithfulness import Faithfulness as Faithfulness
from .faithfulness import FaithfulnessCurve as FaithfulnessCurve
from .faithfulness import circuit_from_scores as circuit_from_scores
from .faithfulness import cmd as cmd
from .faithfulness import cpr as cpr
from .faithfulness import edges_from_scores as edges_from_scores
from .patching import SWEEPS as SWEEPS
from .patching import PatchResult as PatchResult
from .patching import patch_sweep as patch_sweep
from .pruning import PruneResult as PruneResult
from .pruning import circuit_score as circuit_score
from .pruning import component_means as component_means
from .pruning import path_patch_edges as path_patch_edges
from .pruning import prune_nodes as prune_nodes
from .roles import head_roles as head_roles
from .roles import match_roles as match_roles
from .roles import member_attention as member_attention
from .roles import ov_logits as ov_logits
from .roles import role_label as role_label
from .roles import successor_scores as successor_scores
from .tasks import BUILTIN_TASKS as BUILTIN_TASKS
from .tasks import AnswerMetric as AnswerMetric
from .tasks import PromptSet as PromptSet
from .tasks import SequenceTask as SequenceTask
from .tasks import competence as competence
from .tasks import load_task as load_task
from .tasks import load_task_file as load_task_file
from .tasks import make_prompts as make_prompts
