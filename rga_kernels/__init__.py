"""Fused kernels for the relation path of Relation-Aware Global Attention (RGA, CVPR 2020).

``relation_embed(theta, phi, weight, backend="auto")`` computes the relation embedding
``weight · [R(i, :), R(:, i)]`` for every node without ever materializing the affinity matrix
``R = thetaᵀ·phi``. ``python -m rga_kernels.info`` says which backends this machine has.
"""
from .ops import BACKENDS, available_backends, backend_status, relation_embed
from .reference import relation_embed_factorized, relation_embed_reference

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_status",
    "relation_embed",
    "relation_embed_factorized",
    "relation_embed_reference",
]
__version__ = "0.1.0"
