"""STAMINA core: masked low-rank adapters, MLP concept tokens, exact folding, baselines.

Pure torch (+ diffusers / transformers model classes). No Ray, MLflow or S3 in here.
"""

__version__ = "0.1.0"
