from .layers import LoRALinear, MaskedLoRALinear, MaskGenerator, hard_mask

__all__ = ["LoRALinear", "MaskedLoRALinear", "MaskGenerator", "hard_mask"]
