"""Relation-Aware Global Attention (RGA, CVPR 2020) for person re-id."""
from .extractor import FeatureExtractor
from .models import build_model
from .modules import RGAModule

__all__ = ["FeatureExtractor", "RGAModule", "build_model"]
