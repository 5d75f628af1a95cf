"""Evaluate a folded model after concept t: the row R[t, i] for every concept i <= t.

Scores per concept i (prompt "a photo of <c_i>"-style, the concept's own training template):

* ``denoise_mse`` (always; lower is better): mean epsilon-prediction MSE of the model on concept i's
  ingested images with fixed seeded noise and timesteps. Model-agnostic, needs no judge, and the
  same for every step, so its change over t measures forgetting of concept i.
* ``judge_acc`` and ``kid`` (when a judge is given and the concept is one of its classes, i.e. the
  built-in benchmark): fraction of samples the judge assigns to concept i, and KID/MMD² ×10³ between
  samples and held-out real images in the judge's feature space.

Samples of every concept go into one grid ``samples.png`` (rows = concepts).
"""

from __future__ import annotations

import json
import os
import time

from typing import TYPE_CHECKING

from pydantic import Field

from stamina_core.config import StrictModel

if TYPE_CHECKING:  # torch / diffusers load only when a model is evaluated: the job driver stays light
    from stamina_core.models.bundle import DiffusionBundle
    from stamina_core.train import ConceptData


class EvalConcept(StrictModel):
    name: str = Field(description="Concept name.")
    token: str = Field(description="Concept token.")
    prompt: str = Field(description="Prompt used for sampling and the denoising probe.")
    dataset: str = Field(description="The concept's ingested data.parquet: a local path or an s3:// URI (fetched into the cache).")
    judge_class: int | None = Field(None, description="Judge class index of this concept (built-in benchmark only).")


class EvalRequest(StrictModel):
    """What to evaluate after a concept, without where to write it (the Ray Train worker decides)."""

    concepts: list[EvalConcept] = Field(min_length=1, description="Concepts to score (i <= t).")
    samples_per_concept: int = Field(8, ge=1, description="Samples per concept.")
    num_inference_steps: int = Field(25, ge=1, description="DDIM steps.")
    guidance_scale: float = Field(3.0, ge=1.0, description="CFG scale.")
    seed: int = Field(1234, description="Seed of samples and of the denoising probe.")
    probe_timesteps: int = Field(8, ge=1, description="Noise levels per image in the denoising probe.")

    def to_input(self, step_index: int, output_dir: str) -> "EvaluateInput":
        return EvaluateInput(step_index=step_index, output_dir=output_dir, **self.model_dump())


class EvaluateInput(StrictModel):
    step_index: int = Field(ge=1, description="t: the number of concepts learned so far.")
    concepts: list[EvalConcept] = Field(min_length=1, description="Concepts to score (i <= t).")
    output_dir: str = Field(description="Where eval.json and samples.png are written.")
    samples_per_concept: int = Field(8, ge=1, description="Samples per concept.")
    num_inference_steps: int = Field(25, ge=1, description="DDIM steps.")
    guidance_scale: float = Field(3.0, ge=1.0, description="CFG scale.")
    seed: int = Field(1234, description="Seed of samples and of the denoising probe.")
    probe_timesteps: int = Field(8, ge=1, description="Noise levels per image in the denoising probe.")


class EvaluateOutput(StrictModel):
    step_index: int
    row: dict[str, dict[str, float]] = Field(description="concept name -> scores.")
    eval_json: str
    samples_png: str
    wall_s: float


def denoise_mse(bundle: DiffusionBundle, data: ConceptData, prompt: str, seed: int, n_t: int = 8) -> float:
    """Mean eps-MSE over the images x n_t fixed (timestep, noise) pairs; deterministic for a seed."""
    import torch

    with torch.no_grad():
        return _denoise_mse(bundle, data, prompt, seed, n_t)


def _denoise_mse(bundle, data, prompt: str, seed: int, n_t: int) -> float:
    import torch

    bundle.eval()
    x0 = bundle.to_model_space(data.images.to(bundle.device))
    sched = bundle.noise_scheduler
    T = sched.config.num_train_timesteps
    g = torch.Generator().manual_seed(seed)
    ts = torch.linspace(T * 0.05, T * 0.95, n_t).long()
    ctx = bundle.encode_prompt([prompt])
    total = 0.0
    for t in ts:
        noise = torch.randn(x0.shape, generator=g).to(x0)
        tt = torch.full((x0.shape[0],), int(t), device=x0.device)
        noisy = sched.add_noise(x0, noise, tt)
        pred = bundle.unet(noisy, tt, encoder_hidden_states=ctx.expand(x0.shape[0], -1, -1)).sample
        total += float(torch.nn.functional.mse_loss(pred.float(), noise.float()))
    return total / n_t


def evaluate_step(bundle: DiffusionBundle, inp: EvaluateInput, judge=None, heldout: dict | None = None) -> EvaluateOutput:
    """Score every concept in ``inp.concepts`` on ``bundle``; write eval.json and samples.png."""
    import numpy as np
    import torch

    from components.ingest import load_concept_data
    from stamina_core.sample import sample, to_uint8_grid

    t0 = time.perf_counter()
    os.makedirs(inp.output_dir, exist_ok=True)
    row: dict[str, dict[str, float]] = {}
    grids = []
    from components.model_io import fetch

    for c in inp.concepts:
        data = load_concept_data(fetch(c.dataset))
        scores = {"denoise_mse": denoise_mse(bundle, data, c.prompt, inp.seed, inp.probe_timesteps)}
        n = inp.samples_per_concept
        imgs = sample(bundle, [c.prompt] * n, seeds=[inp.seed + k for k in range(n)],
                      num_inference_steps=inp.num_inference_steps, guidance_scale=inp.guidance_scale)
        grids.append(imgs)
        if judge is not None and c.judge_class is not None:
            pred = judge.predict(imgs)
            scores["judge_acc"] = float((pred == c.judge_class).float().mean())
            if heldout is not None and c.name in heldout:
                from stamina_core.eval.metrics import kid_mmd2

                scores["kid"] = float(kid_mmd2(judge.features(imgs), judge.features(heldout[c.name])))
        row[c.name] = scores
    grid = to_uint8_grid(torch.cat(grids), nrow=inp.samples_per_concept)
    png = os.path.join(inp.output_dir, "samples.png")
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(grid)).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(png)
    ej = os.path.join(inp.output_dir, "eval.json")
    wall = time.perf_counter() - t0
    with open(ej, "w") as f:
        json.dump({"step": inp.step_index, "row": row, "concepts": [c.name for c in inp.concepts], "wall_s": wall,
                   "settings": inp.model_dump(exclude={"concepts", "output_dir"})}, f, indent=2, sort_keys=True)
    return EvaluateOutput(step_index=inp.step_index, row=row, eval_json=ej, samples_png=png, wall_s=wall)
