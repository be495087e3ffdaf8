"""Mappers between two models' activation spaces, their evaluation, and vector transfer.

>>> from rosettalens.mapping import AffineMapper, load_mapper
>>> m = AffineMapper().fit(X_src, X_tgt)          # X_src [n, d_src], X_tgt [n, d_tgt]
>>> m.save("runs/map", source_model="a", source_hook="resid_post.3", target_model="b", target_hook="resid_post.5")
>>> load_mapper("runs/map").transform(X_src)       # identical to m.transform(X_src)
"""

from rosettalens.mapping.autoencoder import AutoencoderMapper
from rosettalens.mapping.base import (
    Mapper,
    MapperError,
    get_mapper_class,
    load_mapper,
    load_recorded_mapper,
    mapper_kinds,
    record_mapper,
)
from rosettalens.mapping.linear import AffineMapper, LinearMapper, LowRankMapper, OrthogonalMapper
from rosettalens.mapping.pairs import depth_map, paired_activations
from rosettalens.mapping.transfer import jacobian, transfer_vector

__all__ = [
    "AffineMapper",
    "AutoencoderMapper",
    "LinearMapper",
    "LowRankMapper",
    "Mapper",
    "MapperError",
    "OrthogonalMapper",
    "depth_map",
    "get_mapper_class",
    "jacobian",
    "load_mapper",
    "load_recorded_mapper",
    "mapper_kinds",
    "paired_activations",
    "record_mapper",
    "transfer_vector",
]
