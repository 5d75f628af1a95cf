"""Sampling: DDIM with classifier-free guidance; prompts may hold several concept tokens.

Each sample's initial noise comes from its own seeded generator, so a sample depends only on
(model, prompt, seed): batching and ordering do not change results.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from .models.bundle import DiffusionBundle


def ddim_scheduler(bundle: DiffusionBundle) -> DDIMScheduler:
    return DDIMScheduler.from_config(
        bundle.noise_scheduler.config,
        clip_sample=bundle.pixel_space,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=bundle.noise_scheduler.config.prediction_type,
    )


@torch.no_grad()
def sample(
    bundle: DiffusionBundle,
    prompts: list[str],
    seeds: list[int] | int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Generate one image per prompt; returns (N, C, H, W) in [-1, 1] (fp32, CPU)."""
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds: got {len(seeds)} seeds for {len(prompts)} prompts")
    bundle.eval()
    dev = bundle.device
    dtype = next(bundle.unet.parameters()).dtype
    shape = bundle.model_shape()
    out = []
    rng = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="sampling", unit="batch")
    uncond = None
    for s in rng:
        ps, ss = prompts[s : s + batch_size], seeds[s : s + batch_size]
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(k))) for k in ss]).to(dev, dtype)
        cond = bundle.encode_prompt(ps).to(dtype)
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            if uncond is None:
                uncond = bundle.encode_prompt([""]).to(dtype)
            ctx = torch.cat([uncond.expand(len(ps), -1, -1), cond])
        sched = ddim_scheduler(bundle)
        sched.set_timesteps(num_inference_steps, device=dev)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            if use_cfg:
                eps = bundle.unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            else:
                eps = bundle.unet(x, t, encoder_hidden_states=cond).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        out.append(bundle.to_images(x).float().cpu())
    return torch.cat(out)


def to_uint8_grid(images: torch.Tensor, nrow: int) -> "np.ndarray":  # noqa: F821
    """(N, C, H, W) in [-1, 1] -> an (H*rows, W*nrow, 3) uint8 grid."""
    import numpy as np

    imgs = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    n, c, h, w = imgs.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((3, rows * (h + 1) + 1, nrow * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = imgs[i, :3]
    return grid.permute(1, 2, 0).numpy().astype(np.uint8)
