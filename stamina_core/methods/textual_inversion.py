"""Textual inversion: only the concept token trains (no weight change): the no-forgetting bound."""

from .base import MethodSpec
from .registry import register_method

SPEC = register_method(
    MethodSpec(name="textual_inversion", adapter="none", default_token_kind="direct", description="Token only")
)
