"""Per-layer transcoders: sparse replacements of a model's MLPs (``mlp_in.L -> mlp_out.L``).

:class:`Transcoder` / :class:`TranscoderSet` (model and files) in ``model.py``; training in
``train.py``; evaluation (explained variance, L0, dead features, the model with every MLP replaced)
in ``evaluate.py``; circuit-tracer's published format in ``interop.py``.
"""

from rosettalens.transcoders.model import Transcoder, TranscoderConfig, TranscoderSet

__all__ = ["Transcoder", "TranscoderConfig", "TranscoderSet"]
