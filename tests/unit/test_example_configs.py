"""Every example config in configs/ validates against the schema (the docs cannot rot)."""

from pathlib import Path

import pytest

from components.schemas import SequenceConfig
from stamina_core.config import load_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    cfg = load_yaml(str(path), SequenceConfig)
    assert cfg.concepts or cfg.classification


def test_there_are_examples():
    assert len(CONFIGS) >= 2
