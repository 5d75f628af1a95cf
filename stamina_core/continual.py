"""The in-process continual loop: concepts one after another on one model, folded after each.

This is the reference the pipeline is measured against (``bench/pipeline_overhead.py``) and what the
benchmark (``stamina bench continual``) runs. The pipeline runs the same core calls per concept,
distributed and persisted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import MethodConfig
from .fold import FoldReport
from .methods import begin_concept, get, reference_weights
from .models.bundle import DiffusionBundle
from .train import ConceptData, TrainResult, train_concept


@dataclass
class ConceptItem:
    name: str
    token: str
    data: ConceptData


@dataclass
class ConceptOutcome:
    index: int
    name: str
    token: str
    train: TrainResult
    fold: FoldReport
    deltas: dict[str, torch.Tensor]
    wall_s: float
    eval: dict = field(default_factory=dict)

    def stored_bytes(self) -> int:
        """fp32 bytes of the folded delta (what a chain step stores besides audit files)."""
        return sum(t.numel() * 4 for t in self.deltas.values())


def concept_config(cfg: MethodConfig, index: int) -> MethodConfig:
    """Per-concept copy of the method config with a distinct seed (seed + index)."""
    c = cfg.model_copy(deep=True)
    c.train.seed = cfg.train.seed + index
    return c


def run_continual(
    bundle: DiffusionBundle,
    cfg: MethodConfig,
    concepts: list[ConceptItem],
    evaluate: Callable[[DiffusionBundle, int, list[ConceptItem]], dict] | None = None,
    on_concept: Callable[[ConceptOutcome], None] | None = None,
    progress: bool = False,
    start_index: int = 0,
    reference: dict[str, torch.Tensor] | None = None,
    earlier_prompts: list[str] | None = None,
) -> list[ConceptOutcome]:
    """Learn ``concepts`` in order on ``bundle`` (in place). ``evaluate(bundle, t, seen)`` runs after each fold.

    ``earlier_prompts``: prompts of concepts learned before ``concepts[0]`` (for ``cfg.preserve``); the prompts of
    the concepts learned in this call are added as they are folded."""
    spec = get(cfg.name)
    if reference is None and spec.adapter != "none":
        reference = reference_weights(bundle.unet, cfg.adapter.targets)  # W0: before the first concept
    outcomes = []
    for k, item in enumerate(concepts):
        idx = start_index + k
        t0 = time.perf_counter()
        c_cfg = concept_config(cfg, idx)
        preserve = list(earlier_prompts or []) + [p for it in concepts[:k] for p in it.data.prompts]
        state = begin_concept(spec, c_cfg, bundle.unet, bundle.text_encoder, bundle.tokenizer, item.token, reference,
                              preserve_prompts=preserve)
        res = train_concept(bundle, state, item.data, progress=progress)
        report, deltas = state.fold_with_delta()
        out = ConceptOutcome(idx, item.name, item.token, res, report, deltas, time.perf_counter() - t0)
        if evaluate is not None:
            out.eval = evaluate(bundle, idx, concepts[: k + 1])
        outcomes.append(out)
        if on_concept is not None:
            on_concept(out)
    return outcomes
