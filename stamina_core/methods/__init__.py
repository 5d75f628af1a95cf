"""Continual methods behind a registry (one module each)."""

from .base import ConceptState, MethodSpec, begin_concept, reference_weights
from .registry import available, get, register_method

__all__ = ["ConceptState", "MethodSpec", "available", "begin_concept", "get", "reference_weights", "register_method"]
