"""Sequential LoRA ("merge-and-init"): plain LoRA, folded after each concept; direct token."""

from .base import MethodSpec
from .registry import register_method

SPEC = register_method(
    MethodSpec(name="lora_seq", adapter="lora", default_token_kind="direct", description="Plain LoRA folded after each concept")
)
