"""Ray Tune sweep over dotted ``MethodConfig`` fields with a replay-free objective.

Each trial trains the concept in-process with the core loop (no Ray Train inside Tune) for
``SweepSpec.max_steps`` steps on the training split of the concept's images and reports, every
``report_every`` steps, the objective (lower is better)::

    objective = heldout_loss + drift_weight * drift

* ``heldout_loss``: the denoising loss on held-out images of the *new* concept (a seeded split of
  the ingested images, never trained on), over augmented views (identity, horizontal flip) with
  fixed noise and fixed, evenly spread timesteps.
* ``drift``: the mean squared change of the epsilon-prediction between the parent model and the
  adapted model, for fixed noise and timesteps, on prompts of the *earlier* concepts' tokens plus a
  generic prompt. The clean inputs are images the parent model itself generates for those prompts
  (a few seeded DDIM steps) — no stored image of an earlier concept is ever used.

ASHA (``time_attr="step"``) stops weak trials early. The best trial is the lowest final objective
among trials that ran ``max_steps`` (objectives at different step counts are not comparable).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from components.schemas import ConceptSpec, SweepSpec
from stamina_core.config import MethodConfig, StrictModel, config_hash, parse
from stamina_core.errors import ConfigError, StaminaError
from stamina_core.models import DiffusionBundle
from stamina_core.train import ConceptData


class SweepError(StaminaError, RuntimeError):
    """The sweep produced no usable trial."""


class SweepInput(StrictModel):
    """One concept's sweep."""

    sequence_id: str = Field(description="Sequence id (first part of the Tune run name).")
    index: int = Field(ge=0, description="Position of the concept in the sequence (0-based).")
    base_dir: str = Field(description="The chain's base model: a local diffusers folder or an s3:// prefix.")
    parent_deltas: list[str] = Field(default_factory=list, description="delta.safetensors of the earlier concepts, in order (local or s3://).")
    reference_dir: str | None = Field(None, description="Model whose weights are W0 (local or s3://); default: base_dir.")
    method: MethodConfig = Field(description="Base method config; swept fields are overridden per trial.")
    concept: ConceptSpec = Field(description="The new concept (token, prompt).")
    dataset: str = Field(description="data.parquet written by components.ingest (local or s3://).")
    earlier_prompts: list[str] = Field(default_factory=list, description="Prompts of the earlier concepts' tokens (drift probes; "
                                       "also what method.preserve preserves).")
    generic_prompt: str = Field("a photo", description="A generic prompt added to the drift probes ('' = unconditional).")
    spec: SweepSpec = Field(default_factory=SweepSpec, description="Space, trial budget, ASHA settings, drift weight.")
    storage_path: str = Field(description="Tune storage: an s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL) or a local folder.")
    search: Literal["auto", "grid", "choice"] = Field(
        "auto", description="'grid': every combination once; 'choice': num_samples random draws; 'auto': grid if it fits num_samples."
    )
    report_every: int = Field(5, ge=1, description="Evaluate and report the objective every N steps.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA reduction factor.")
    holdout_fraction: float = Field(0.25, gt=0, lt=1, description="Fraction of the concept's images held out (at least 1).")
    probe_noise: int = Field(4, ge=1, description="Fixed (noise, timestep) draws per held-out view.")
    drift_samples: int = Field(4, ge=1, description="Parent-generated samples per drift prompt.")
    drift_sample_steps: int = Field(10, ge=1, description="DDIM steps used to generate the drift probes' clean inputs.")
    seed: int = Field(0, description="Seed of the split, the probes and the 'choice' draws.")
    cache_dir: str | None = Field(None, description="Cache for s3:// inputs (default $STAMINA_CACHE or ~/.cache/stamina).")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs per Tune trial.")

    def run_name(self) -> str:
        ident = self.model_dump(mode="json", exclude={"storage_path", "cache_dir", "cpus_per_trial"})
        return f"{self.sequence_id}-{self.index:03d}-sweep-{config_hash(_Ident(ident=ident))}"


class _Ident(StrictModel):
    ident: dict = Field(description="Canonical identity of a sweep.")


class TrialResult(StrictModel):
    """One trial, for MLflow."""

    trial_id: str = Field(description="Tune trial id.")
    params: dict[str, float | int | str | bool] = Field(description="Swept values of this trial (dotted MethodConfig field -> value).")
    objective: float | None = Field(description="Last reported objective (None if the trial reported nothing).")
    heldout_loss: float | None = Field(description="Last held-out denoising loss.")
    drift: float | None = Field(description="Last drift value.")
    steps: int = Field(description="Training steps the trial ran (< max_steps when ASHA stopped it).")
    history: list[dict[str, float]] = Field(default_factory=list, description="Every report: step, objective, heldout_loss, drift, train_loss.")
    error: str | None = Field(None, description="First line of the trial's error, if it failed.")


class SweepOutput(StrictModel):
    """The chosen config and every trial."""

    run_name: str = Field(description="Tune run name.")
    best_config: dict = Field(description="The base MethodConfig with the best trial's values (model_dump, json mode).")
    best_params: dict[str, float | int | str | bool] = Field(description="The best trial's swept values.")
    best_objective: float = Field(description="The best trial's final objective.")
    trials: list[TrialResult] = Field(description="All trials.")
    search: Literal["grid", "choice"] = Field(description="How the space was searched.")
    wall_s: float = Field(description="Wall time of the sweep in seconds.")


# -- config overrides -----------------------------------------------------------------------------

def apply_overrides(method: MethodConfig, overrides: dict, max_steps: int | None = None) -> MethodConfig:
    """``method`` with dotted fields replaced (e.g. ``{"adapter.rank": 2}``); a bad key or value is a ConfigError."""
    data = method.model_dump(mode="json")
    for key, val in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"sweep.space: {key!r} is not a MethodConfig field (no section {p!r})")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"sweep.space: {key!r} is not a MethodConfig field; known in this section: {', '.join(sorted(node))}")
        node[parts[-1]] = val
    if max_steps is not None:
        data["train"]["max_train_steps"] = max_steps
        data["train"]["checkpointing_steps"] = 0
    return parse(MethodConfig, data, source="sweep.space")


# -- the replay-free objective ---------------------------------------------------------------------

def split_holdout(data: ConceptData, fraction: float, seed: int) -> tuple[ConceptData, ConceptData]:
    """Seeded split into (train, held-out); at least one image on each side."""
    n = data.images.shape[0]
    if n < 2:
        raise ConfigError(f"sweep: the concept has {n} image(s); a held-out split needs at least 2")
    k = min(n - 1, max(1, round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    hold, train = sorted(perm[:k]), sorted(perm[k:])
    return (ConceptData(data.images[train], [data.prompts[i] for i in train]),
            ConceptData(data.images[hold], [data.prompts[i] for i in hold]))


def _spread_timesteps(n: int, T: int) -> torch.Tensor:
    return torch.tensor([int((i + 0.5) * T / n) for i in range(n)], dtype=torch.long)


class ReplayFreeProbe:
    """Fixed inputs for the held-out loss (new concept) and the drift (earlier prompts) of one sweep trial.

    Build it on the *parent* model (before ``begin_concept``); ``evaluate`` on the adapted model.
    """

    def __init__(self, bundle: DiffusionBundle, heldout: ConceptData, drift_prompts: list[str], noise_per_view: int = 4,
                 drift_samples: int = 4, drift_sample_steps: int = 10, seed: int = 0):
        from stamina_core.sample import sample

        sched = bundle.noise_scheduler
        T = sched.config.num_train_timesteps
        g = torch.Generator().manual_seed(seed)
        dev = bundle.device
        # held-out views of the new concept: identity + horizontal flip, each with fixed noise / timesteps
        views = torch.cat([heldout.images, heldout.images.flip(-1)]).to(dev)
        prompts = heldout.prompts + heldout.prompts
        x0 = bundle.to_model_space(views).repeat_interleave(noise_per_view, 0)
        self.heldout_prompts = [p for p in prompts for _ in range(noise_per_view)]
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = _spread_timesteps(x0.shape[0], T)[torch.randperm(x0.shape[0], generator=g)].to(dev)
        self.h_noisy = sched.add_noise(x0, noise, t)
        self.h_t = t
        self.h_target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        # drift probes: the parent's own samples for earlier prompts, noised at fixed timesteps
        self.drift_prompts = [p for p in drift_prompts for _ in range(drift_samples)]
        if self.drift_prompts:
            seeds = [seed * 100_003 + i for i in range(len(self.drift_prompts))]
            imgs = sample(bundle, self.drift_prompts, seeds, num_inference_steps=drift_sample_steps, guidance_scale=1.0)
            d0 = bundle.to_model_space(imgs.to(dev))
            dn = torch.randn(d0.shape, generator=g).to(dev)
            dt = _spread_timesteps(d0.shape[0], T)[torch.randperm(d0.shape[0], generator=g)].to(dev)
            self.d_noisy, self.d_t = sched.add_noise(d0, dn, dt), dt
            self.parent_eps = self._eps(bundle, self.d_noisy, self.d_t, self.drift_prompts)

    @staticmethod
    @torch.no_grad()
    def _eps(bundle: DiffusionBundle, x: torch.Tensor, t: torch.Tensor, prompts: list[str], batch: int = 64) -> torch.Tensor:
        out = []
        for s in range(0, x.shape[0], batch):
            ctx = bundle.encode_prompt(prompts[s:s + batch])
            out.append(bundle.unet(x[s:s + batch], t[s:s + batch], encoder_hidden_states=ctx).sample.float())
        return torch.cat(out)

    def evaluate(self, bundle: DiffusionBundle, drift_weight: float) -> dict[str, float]:
        modes = (bundle.unet.training, bundle.text_encoder.training)
        bundle.unet.eval()
        bundle.text_encoder.eval()
        try:
            pred = self._eps(bundle, self.h_noisy, self.h_t, self.heldout_prompts)
            heldout = float(F.mse_loss(pred, self.h_target.float()))
            drift = 0.0
            if self.drift_prompts:
                drift = float(F.mse_loss(self._eps(bundle, self.d_noisy, self.d_t, self.drift_prompts), self.parent_eps))
        finally:
            bundle.unet.train(modes[0])
            bundle.text_encoder.train(modes[1])
        return {"objective": heldout + drift_weight * drift, "heldout_loss": heldout, "drift": drift}


# -- the trial ------------------------------------------------------------------------------------

def run_trial(inp: SweepInput, params: dict, report) -> None:
    """Train one configuration in-process and call ``report(metrics)`` every ``report_every`` steps."""
    from components.ingest import load_concept_data
    from components.model_io import fetch, load_parent
    from stamina_core.methods import begin_concept, get
    from stamina_core.train import train_concept

    cfg = apply_overrides(inp.method, params, inp.spec.max_steps)
    cache = inp.cache_dir
    base = fetch(inp.base_dir, cache, directory=True)
    deltas = [fetch(p, cache) for p in inp.parent_deltas]
    ref = fetch(inp.reference_dir, cache, directory=True) if inp.reference_dir else None
    bundle, reference = load_parent(base, deltas, cfg.adapter.targets, ref)
    data = load_concept_data(fetch(inp.dataset, cache))
    train, held = split_holdout(data, inp.holdout_fraction, inp.seed)
    drift_prompts = list(inp.earlier_prompts) + [inp.generic_prompt]
    probe = ReplayFreeProbe(bundle, held, drift_prompts, inp.probe_noise, inp.drift_samples, inp.drift_sample_steps, inp.seed)
    state = begin_concept(get(cfg.name), cfg, bundle.unet, bundle.text_encoder, bundle.tokenizer, inp.concept.token, reference,
                          preserve_prompts=list(inp.earlier_prompts))
    total = cfg.train.max_train_steps

    def on_step(done: int, metrics: dict) -> None:
        if done % inp.report_every == 0 or done == total:
            r = probe.evaluate(bundle, inp.spec.drift_weight)
            if not all(math.isfinite(v) for v in r.values()):
                raise FloatingPointError(f"sweep trial {params}: objective became non-finite at step {done}")
            report({**r, "step": done, "train_loss": float(metrics["loss"])})

    train_concept(bundle, state, train, on_step=on_step)


def _tune_trainable(config: dict, inp_json: dict) -> None:
    from ray import tune

    torch.set_num_threads(1)
    inp = SweepInput.model_validate(inp_json)
    run_trial(inp, {k: config[k] for k in inp.spec.space}, tune.report)


# -- the driver -----------------------------------------------------------------------------------

def _search(inp: SweepInput) -> Literal["grid", "choice"]:
    if inp.search != "auto":
        return inp.search
    n_grid = math.prod(len(v) for v in inp.spec.space.values())
    return "grid" if n_grid <= inp.spec.num_samples else "choice"


def sweep(inp: SweepInput) -> SweepOutput:
    """Run the Tune sweep and return the best config and every trial's results."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from components.train_concept import ray_storage

    space = inp.spec.space
    if not space:
        raise ConfigError("sweep.space: empty; give at least one dotted MethodConfig field with candidate values")
    for k, vals in space.items():
        if not vals:
            raise ConfigError(f"sweep.space.{k}: no candidate values")
        for v in vals:
            apply_overrides(inp.method, {k: v})  # every value must validate before any trial starts
    mode = _search(inp)
    if mode == "grid":
        param_space = {k: tune.grid_search(list(v)) for k, v in space.items()}
        num_samples = 1
    else:
        param_space = {k: tune.choice(list(v)) for k, v in space.items()}
        num_samples = inp.spec.num_samples
    max_t = inp.spec.max_steps
    sched = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(inp.spec.grace_period, max_t),
                          reduction_factor=inp.reduction_factor)
    path, fs = ray_storage(inp.storage_path)
    name = inp.run_name()
    trainable = tune.with_resources(tune.with_parameters(_tune_trainable, inp_json=inp.model_dump(mode="json")),
                                    {"cpu": inp.cpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="objective", mode="min", scheduler=sched, num_samples=num_samples,
                                    search_alg=BasicVariantGenerator(random_state=inp.seed)),
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, verbose=0),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    trials: list[TrialResult] = []
    for r in grid:
        params = {k: r.config[k] for k in space}
        hist = []
        df = r.metrics_dataframe
        if df is not None and "objective" in df:
            for row in df.to_dict("records"):
                hist.append({k: float(row[k]) for k in ("step", "objective", "heldout_loss", "drift", "train_loss") if k in row})
        last = hist[-1] if hist else {}
        err = None
        if r.error is not None:
            err = (str(r.error).strip().splitlines() or [type(r.error).__name__])[0]
        trials.append(TrialResult(trial_id=str(r.path).rstrip("/").rsplit("/", 1)[-1], params=params,
                                  objective=last.get("objective"), heldout_loss=last.get("heldout_loss"),
                                  drift=last.get("drift"), steps=int(last.get("step", 0)), history=hist, error=err))
    ok = [t for t in trials if t.objective is not None and t.error is None]
    if not ok:
        first = next((t.error for t in trials if t.error), "no trial reported an objective")
        raise SweepError(f"sweep {name}: every trial failed ({first}); fix the cause (see the trial logs) and rerun")
    full = [t for t in ok if t.steps >= max_t] or ok
    best = min(full, key=lambda t: (t.objective, sorted((k, str(v)) for k, v in t.params.items())))
    best_cfg = apply_overrides(inp.method, best.params)
    return SweepOutput(run_name=name, best_config=best_cfg.model_dump(mode="json"), best_params=best.params,
                       best_objective=float(best.objective), trials=trials, search=mode, wall_s=wall)
