import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: 1 thread is as fast and never oversubscribes next to Ray workers


def micro_model_config(**kw):
    from stamina_core.models import TinyModelConfig

    base = dict(sample_size=8, channels=1, block_out_channels=[16, 32], cross_attention_dim=16,
                text_intermediate=32, text_layers=1, max_length=32)
    base.update(kw)
    return TinyModelConfig(**base)


@pytest.fixture
def micro_config():
    """Factory for the micro TinyModelConfig (tests may override fields)."""
    return micro_model_config


@pytest.fixture
def micro_bundle(tmp_path):
    """A very small tiny-SD bundle (pixel space, 8 px) built from config: milliseconds per step."""
    from stamina_core.models import build_tiny

    torch.manual_seed(0)
    return build_tiny(micro_model_config(), workdir=str(tmp_path)).eval()
