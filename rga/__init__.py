"""Relation-Aware Global Attention (RGA, CVPR 2020) for person re-id."""
from .models import build_model
from .modules import RGAModule

__all__ = ["RGAModule", "build_model"]
