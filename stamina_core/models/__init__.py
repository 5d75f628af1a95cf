from .bundle import DiffusionBundle, TinyModelConfig, build_tiny, load_model, noise_scheduler
from .tokenizer import build_byte_tokenizer

__all__ = ["DiffusionBundle", "TinyModelConfig", "build_tiny", "build_byte_tokenizer", "load_model", "noise_scheduler"]
