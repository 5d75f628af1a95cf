"""Pretrain the tiny SD-family base model on the benchmark's base classes (deterministic, cached).

16 px pixel space, 1 channel: ``UNet2DConditionModel`` + ``CLIPTextModel`` (byte-level CLIP tokenizer)
trained jointly with the epsilon objective of the model's ``DDPMScheduler``; 10 % empty captions so
classifier-free guidance works; AdamW, linear warmup then cosine decay, gradient clipping, batch 32.
The default budget is 2400 steps (TINY.md §3: 2150 steps gave 0.65 judge accuracy on samples of the 5 animal
classes). Since session 10 the default is the **15-minute base**: UNet widths 16,48,64 (the full-resolution level
halved, the 8×8 one narrowed), Min-SNR loss weighting (``snr_gamma`` 5) and 2 torch threads: 0.338 s/step on 2
idle threads against 0.435 for the old 32,64,64 model (``bench/pretrain_step.py --widths``), and it draws its own
base classes better (glyphs 0.89 vs 0.66 judge accuracy, RESULTS.md "Base recipes"). The old default, the base
every table before session 10 ran on (``tiny-f4f0e6d5b69f``), is ``legacy_pretrain_config()``
(``stamina pretrain-tiny --legacy``; benchmarks: the Makefile's ``BASE_LEGACY`` flags).

Threads are part of the config (``PretrainConfig.threads``, default 2): the thread count changes the
reduction order and so the weights (another count is another base, another cache key). On a shared,
loaded 2-core machine two torch threads stall each other (measured 2026-11-26 at load ~5: 10 s/step with
2 threads, 0.78 s/step with 1), so pretrain before starting other work. Timings: BENCHMARKS.md.

Two-object pretraining (session 13, opt-in): ``pair_fraction`` replaces that share of the images by two base classes
side by side captioned "a photo of a A and a B" (``pair_kinds``: from one kind only), so a base can learn to draw
pairs; 0 (default) leaves every base as it was. RESULTS.md "A base that draws pairs of its own classes".

The result is cached under ``cache_dir/tiny-<config hash>/`` in the ``DiffusionBundle.save`` layout
plus ``pretrain.json`` (config, loss curve, timings) and ``done.json`` (sha256 of every file), written
last. A folder without a valid ``done.json`` is never used: it is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .config import StrictModel, config_hash, parse
from .data.benchmark import LEGACY_HASH_VALUES, BenchmarkConfig, ContinualBenchmark, to_tensor_range, tiny_benchmark_config
from .errors import CheckpointError
from .models.config import TinyModelConfig, pretrained_tiny_config
from .hashing import sha256_file
from .paths import default_pretrained_dir

DONE_FILE = "done.json"
# Caption of a two-object pretraining image (PretrainConfig.pair_fraction): the base classes' own caption
# "a photo of a {name}" joined by "and", in the order the two objects stand (left, right).
PAIR_CAPTION = "a photo of a {a} and a {b}"
# The base every table before session 10 ran on (its cache folder: tiny-f4f0e6d5b69f).
LEGACY_BASE_HASH = "f4f0e6d5b69f"
INFO_FILE = "pretrain.json"


class PretrainConfig(StrictModel):
    """Pretraining of the tiny base model (everything that changes the weights is in the hash)."""

    model: TinyModelConfig = Field(
        default_factory=pretrained_tiny_config,
        description="Architecture of the tiny model (default UNet widths 16,48,64: the 15-minute base, session 10; "
        "the legacy base used TinyModelConfig's 32,64,64).",
    )
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig, description="Benchmark whose base classes are used.")
    max_train_steps: int = Field(2400, ge=1, description="Optimizer steps.")
    train_batch_size: int = Field(32, ge=1, description="Images per step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate of the UNet.")
    text_learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate of the text encoder.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (UNet and text encoder).")
    lr_warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    lr_scheduler: str = Field("cosine", description="diffusers.optimization scheduler name (e.g. cosine, constant_with_warmup).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="Probability of an empty caption (classifier-free guidance).")
    hflip: bool = Field(True, description="Random horizontal flips of classes where they keep the class (animals).")
    seed: int = Field(0, description="Seed of batches, noise, timesteps and caption dropout.")
    threads: int = Field(
        2,
        ge=1,
        description="torch CPU threads while training. It changes the weights (reduction order): 2400 steps on 2 "
        "threads end 3e-4 (relative Frobenius) away from 1 thread, so it is part of the cache key. Default 2 "
        "(session 10: the 15-minute base); the legacy base tiny-f4f0e6d5b69f is the 1-thread one.",
    )
    snr_gamma: float | None = Field(
        5.0,
        gt=0,
        description="Min-SNR loss weighting (Hang et al. 2023, diffusers' snr_gamma): each sample's epsilon MSE is "
        "weighted by min(SNR(t), gamma) / SNR(t), so the many nearly-clean timesteps stop dominating the gradient. "
        "Default 5 (session 10); None = plain MSE (the legacy base tiny-f4f0e6d5b69f).",
    )
    word_tokens: bool = Field(
        False,
        description="Give every word of the base captions its own token id (model.words), as real CLIP does for "
        "common words; False keeps captions byte-level (class names then differ only in their last bytes). "
        "Tried as the default and measured worse on animals and no better on glyphs (RESULTS.md).",
    )
    pair_fraction: float = Field(
        0.0,
        ge=0,
        le=0.9,
        description="Fraction of training images replaced by a two-object image: two different base classes side by "
        "side, each shrunk 2x, at a random height (eval.pair_judge.compose_t), captioned "
        f"'{PAIR_CAPTION}' (left, right), so the base learns to draw two objects for one 'and' prompt. "
        "0 (default): single-object captions only, as every base before session 13 (RESULTS.md 'Multi-concept prompts').",
    )
    pair_kinds: list[Literal["animal", "glyph"]] = Field(
        default_factory=list,
        description="With pair_fraction: pair only base classes of these kinds ('animal', 'glyph'), both images drawn "
        "from that pool; empty (default): any two different base classes, the batch's image on the left.",
    )

    @field_validator("pair_kinds", mode="before")
    @classmethod
    def _kinds_from_text(cls, v):
        return [k.strip() for k in v.split(",") if k.strip()] if isinstance(v, str) else v  # --base-set pair_kinds=animal

    @model_validator(mode="after")
    def _pair_kinds_need_pairs(self) -> "PretrainConfig":
        if self.pair_kinds and not self.pair_fraction:
            raise ValueError("pair_kinds: only used with pair_fraction > 0")
        return self

    def hash(self) -> str:
        """Config hash; fields added later are left out while at their defaults, so caches keyed by an
        older hash (the pretrained base) stay valid."""
        import hashlib

        d = self.model_dump(mode="json")
        for key, default in _LATER_FIELDS.items():
            if d.get(key) == default:
                d.pop(key)
        for key, default in _LATER_MODEL_FIELDS.items():
            if d["model"].get(key) == default:
                d["model"].pop(key)
        for key, default in LEGACY_HASH_VALUES.items():
            if d["benchmark"].get(key) == default:
                d["benchmark"].pop(key)
        payload = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


_LATER_FIELDS = {"word_tokens": False, "threads": 1, "snr_gamma": None, "pair_fraction": 0.0, "pair_kinds": []}



def legacy_pretrain_config() -> PretrainConfig:
    """The pre-session-10 default: TinyModelConfig's widths 32,64,64, plain MSE, 1 thread (``tiny-f4f0e6d5b69f``)."""
    return PretrainConfig(model=TinyModelConfig(), snr_gamma=None, threads=1)
_LATER_MODEL_FIELDS = {"words": [], "full_res_attention": False}


def tiny_pretrain_config() -> PretrainConfig:
    """A seconds-long config for tests (tiny widths, tiny benchmark, 30 steps)."""
    return PretrainConfig(
        model=TinyModelConfig(block_out_channels=[8, 16], cross_attention_dim=16, text_intermediate=32, text_heads=2,
                              text_layers=1, attention_head_dim=2),
        benchmark=tiny_benchmark_config(),
        max_train_steps=30,
        train_batch_size=8,
        lr_warmup_steps=5,
        threads=1,
        snr_gamma=None,
    )


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if rel != DONE_FILE:
                out.append(rel)
    return sorted(out)


def is_complete(path: str, expected_hash: str | None = None) -> bool:
    """True when ``path`` has a ``done.json`` whose digests match every listed file (and the config hash)."""
    try:
        with open(os.path.join(path, DONE_FILE), encoding="utf-8") as f:
            done = json.load(f)
    except (OSError, ValueError):
        return False
    if expected_hash is not None and done.get("config_hash") != expected_hash:
        return False
    files = done.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, digest in files.items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p) or sha256_file(p) != digest:
            return False
    return True


def write_done(path: str, extra: dict) -> None:
    """Write ``done.json`` (sha256 of every other file) last, atomically."""
    done = dict(extra, files={rel: sha256_file(os.path.join(path, rel)) for rel in _files(path)})
    tmp = os.path.join(path, DONE_FILE + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(done, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, DONE_FILE))


def pretrain_tiny(cfg: PretrainConfig | None = None, cache_dir: str = ".stamina/cache", progress: bool = True) -> str:
    """Return the folder of the pretrained tiny model for ``cfg``, training it first if not cached."""
    cfg = cfg or PretrainConfig()
    key = cfg.hash()
    out = os.path.abspath(os.path.join(cache_dir, f"tiny-{key}"))
    if is_complete(out, key):
        return out
    if os.path.exists(out):
        shutil.rmtree(out)  # incomplete or corrupt: never used
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        info = _train(cfg, tmp, progress)
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        write_done(tmp, {"config_hash": key, "kind": "stamina-tiny-pretrained/1"})
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            if not is_complete(out, key):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not is_complete(out, key):
        raise CheckpointError(f"{out}: pretrained model failed its digest check right after writing; delete it and rerun")
    return out


def model_config(cfg: PretrainConfig, captions: list[str]) -> TinyModelConfig:
    """The architecture actually built: ``cfg.model`` plus, with ``word_tokens``, the caption words."""
    if not cfg.word_tokens:
        return cfg.model
    words = sorted(set(cfg.model.words) | {w for c in captions for w in c.split()})
    return cfg.model.model_copy(update={"words": words})


def _train(cfg: PretrainConfig, workdir: str, progress: bool) -> dict:
    import torch

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # part of the config: the thread count changes the weights
    try:
        return _train_pinned(cfg, workdir, progress)
    finally:
        torch.set_num_threads(prev_threads)


def _train_pinned(cfg: PretrainConfig, workdir: str, progress: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from .models.bundle import build_tiny
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr

    t0 = time.time()
    bench = ContinualBenchmark(cfg.benchmark)
    x_u8, captions, labels = bench.pretrain_data()
    images = to_tensor_range(x_u8)
    if images.shape[-1] != cfg.model.sample_size or cfg.model.channels != 1 or cfg.model.latent:
        raise CheckpointError(
            f"model: pretraining is pixel space, 1 channel, sample_size={images.shape[-1]} (benchmark.size); "
            f"got sample_size={cfg.model.sample_size}, channels={cfg.model.channels}, latent={cfg.model.latent}"
        )
    flip_ok = torch.tensor([bench.classes[int(y)].hflip_ok for y in labels])
    pair_caps = pair_captions(bench, cfg.pair_kinds) if cfg.pair_fraction > 0 else {}
    bundle = build_tiny(model_config(cfg, captions + sorted(pair_caps.values())), workdir=os.path.join(workdir, ".build"))
    unet, te = bundle.unet, bundle.text_encoder
    uniq = sorted(set(captions) | set(pair_caps.values())) + [""]
    _check_caption_lengths(bundle.tokenizer, uniq)
    cap_index = {c: i for i, c in enumerate(uniq)}
    ids_table = bundle.tokenize(uniq)
    cap_ids = torch.tensor([cap_index[c] for c in captions])
    empty = cap_index[""]
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    n_labels = int(labels_t.max()) + 1
    pair_cid = torch.full((n_labels, n_labels), -1, dtype=torch.long)  # (left label, right label) -> caption id
    for (la, lb), cap in pair_caps.items():
        pair_cid[la, lb] = cap_index[cap]
    pool = None
    if cfg.pair_kinds:
        kinds = {c.index: c.kind for c in bench.base_classes}
        pool = torch.tensor([i for i, y in enumerate(labels.tolist()) if kinds[int(y)] in cfg.pair_kinds])
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.learning_rate},
            {"params": list(te.parameters()), "lr": cfg.text_learning_rate},
        ],
        weight_decay=cfg.adam_weight_decay,
    )
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps,
                          num_training_steps=cfg.max_train_steps)
    ns = bundle.noise_scheduler
    T = ns.config.num_train_timesteps
    unet.train()
    te.train()
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_train_steps, desc="pretrain", unit="step")
    n = len(images)
    bs = cfg.train_batch_size
    for step in range(cfg.max_train_steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, n, (bs,), generator=g)
        x = images[idx]
        if cfg.hflip:
            flip = (torch.rand(bs, generator=g) < 0.5) & flip_ok[idx]
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        cid = torch.where(torch.rand(bs, generator=g) < cfg.cfg_dropout, torch.full((bs,), empty), cap_ids[idx])
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, T, (bs,), generator=g)
        if pair_caps:  # drawn after the single-object draws, so pair_fraction 0 keeps every base bit for bit
            x, cid = _with_pairs(cfg, g, x, cid, idx, images, labels_t, pair_cid, empty, pool)
        noisy = ns.add_noise(x, noise, t)
        ctx = te(ids_table[cid])[0]
        pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        if cfg.snr_gamma is None:
            loss = F.mse_loss(pred, noise)
        else:
            snr = compute_snr(ns, t)
            w = torch.where(snr > 0, torch.clamp(snr, max=cfg.snr_gamma) / snr.clamp(min=1e-12), torch.ones_like(snr))
            loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), cfg.max_grad_norm)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        if not torch.isfinite(loss):
            raise CheckpointError(f"pretrain: loss became {lv} at step {step}; lower learning_rate or max_grad_norm")
        losses.append(lv)
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    if bar is not None:
        bar.close()
    bundle.eval()
    shutil.rmtree(os.path.join(workdir, ".build"), ignore_errors=True)
    bundle.save(workdir)
    wall = time.time() - t0
    every = max(1, len(losses) // 200)
    return {
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.hash(),
        "steps": cfg.max_train_steps,
        "images": n,
        "base_classes": [c.name for c in bench.base_classes],
        "wall_s": round(wall, 2),
        "s_per_step": round(wall / cfg.max_train_steps, 4),
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "loss_curve": {"every": every, "values": [sum(losses[i:i + every]) / len(losses[i:i + every])
                                                  for i in range(0, len(losses), every)]},
        "torch_threads": torch.get_num_threads(),
    }


def pair_captions(bench: ContinualBenchmark, kinds: list[str] | None = None) -> dict[tuple[int, int], str]:
    """Caption of every ordered pair of two different base classes (of ``kinds``; all when empty), keyed by (left,
    right) judge label."""
    base = [c for c in bench.base_classes if not kinds or c.kind in kinds]
    if len(base) < 2:
        raise CheckpointError(f"pair_kinds: {kinds} leaves {len(base)} base class(es); pairs need at least 2")
    return {(a.index, b.index): PAIR_CAPTION.format(a=a.name, b=b.name) for a in base for b in base if a.index != b.index}


def _check_caption_lengths(tokenizer, captions: list[str]) -> None:
    """Every caption must fit the tokenizer's length: a truncated pair caption would lose its second object."""
    limit = tokenizer.model_max_length
    for c in captions:
        n = len(tokenizer(c, truncation=False)["input_ids"])
        if n > limit:
            raise CheckpointError(f"pretrain: caption {c!r} is {n} tokens, over model.max_length={limit}; "
                                  "raise model.max_length or use shorter class names")


def _with_pairs(cfg: PretrainConfig, g, x, cid, idx, images, labels_t, pair_cid, empty, pool=None):
    """Replace a ``cfg.pair_fraction`` share of the batch by side-by-side composites of two different classes (the
    batch's image on the left, a random other image on the right, at a random height) with their pair caption;
    images whose caption was dropped for classifier-free guidance keep the empty caption. With ``pool`` (indices of
    the images of ``cfg.pair_kinds``), both images of a pair come from the pool."""
    import torch

    from .eval.pair_judge import compose_t

    bs, h = x.shape[0], x.shape[-2]
    want = torch.rand(bs, generator=g) < cfg.pair_fraction
    left = x
    if pool is not None:
        idx = pool[torch.randint(0, len(pool), (bs,), generator=g)]
        left = images[idx]
        idx2 = pool[torch.randint(0, len(pool), (bs,), generator=g)]
    else:
        idx2 = torch.randint(0, len(images), (bs,), generator=g)
    offset = torch.randint(0, h // 2 + 1, (bs,), generator=g)
    la, lb = labels_t[idx], labels_t[idx2]
    use = want & (la != lb) & (pair_cid[la, lb] >= 0)
    if not bool(use.any()):
        return x, cid
    comp = compose_t(left, images[idx2], "side_by_side", offset)
    x = torch.where(use[:, None, None, None], comp, x)
    cid = torch.where(use & (cid != empty), pair_cid[la, lb], cid)
    return x, cid


def cli_config(test_config: bool = False, steps: int | None = None, seed: int | None = None,
               threads: int | None = None, word_tokens: bool = False, snr_gamma: float | None = None,
               legacy: bool = False, pair_fraction: float | None = None,
               pair_kinds: list[str] | str | None = None) -> PretrainConfig:
    """The config the CLIs build (``stamina pretrain-tiny``, ``python -m stamina_core.pretrain``), validated;
    ``legacy`` starts from the pre-session-10 default (``legacy_pretrain_config``)."""
    if test_config and legacy:
        raise ValueError("pretrain: --test-config and --legacy are two different bases; give one")
    cfg = tiny_pretrain_config() if test_config else legacy_pretrain_config() if legacy else PretrainConfig()
    upd = {}
    if steps is not None:
        upd["max_train_steps"] = steps
    if seed is not None:
        upd["seed"] = seed
    if threads is not None:
        upd["threads"] = threads
    if word_tokens:
        upd["word_tokens"] = True
    if snr_gamma is not None:
        upd["snr_gamma"] = snr_gamma
    if pair_fraction is not None:
        upd["pair_fraction"] = pair_fraction
    if pair_kinds:  # a list, or "animal,glyph" as the CLIs pass it (PretrainConfig splits it)
        upd["pair_kinds"] = pair_kinds
    return parse(PretrainConfig, {**cfg.model_dump(), **upd}, source="pretrain")


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m stamina_core.pretrain [--cache-dir DIR] [--steps N] [--tiny] [--threads N]`` prints the
    model folder (``stamina pretrain-tiny`` is the same command)."""
    import argparse

    p = argparse.ArgumentParser(description="Pretrain (or reuse) the tiny base model on the benchmark's base classes.")
    p.add_argument("--cache-dir", default=None, help="default: $STAMINA_CACHE/pretrained or ~/.cache/stamina/pretrained")
    p.add_argument("--max_train_steps", "--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="the seconds-long test config")
    p.add_argument("--threads", type=int, default=None, help="torch threads while training (PretrainConfig.threads; "
                   "default 2; another count is another base)")
    p.add_argument("--legacy", action="store_true", help="the pre-session-10 base tiny-f4f0e6d5b69f (32,64,64, plain MSE, 1 thread)")
    p.add_argument("--word-tokens", action="store_true", help="one token id per caption word (PretrainConfig.word_tokens)")
    p.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR loss weighting (PretrainConfig.snr_gamma)")
    p.add_argument("--pair-fraction", type=float, default=None, help="share of two-object captioned images "
                   "(PretrainConfig.pair_fraction; default 0)")
    p.add_argument("--pair-kinds", default=None, help="with --pair-fraction: pair only these kinds (animal, glyph)")
    a = p.parse_args(argv)
    try:
        cfg = cli_config(a.tiny, a.max_train_steps, a.seed, a.threads, a.word_tokens, a.snr_gamma, a.legacy,
                         a.pair_fraction, a.pair_kinds)
    except ValueError as e:
        raise SystemExit(str(e))
    print(pretrain_tiny(cfg, a.cache_dir or default_pretrained_dir(), progress=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
