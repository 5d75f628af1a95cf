"""Cost of one pretraining step of the tiny base, measured side by side: batch size x threads x memory format.

    python bench/pretrain_step.py                     # threads 1,2; batch 32,16,8; NCHW and channels_last
    python bench/pretrain_step.py --compile           # + torch.compile of the forward (compile time reported)
    python bench/pretrain_step.py --threads 1 --batches 32 --formats nchw --widths "32,64,64;24,48,48;16,48,48"
                                                      # narrower UNets (block_out_channels), side by side

The step is the one ``stamina_core.pretrain`` trains (default ``PretrainConfig``: text encoder + UNet forward,
epsilon MSE, backward, AdamW), on the real pretraining images; only the timing loop is new. Variants are timed
interleaved (round robin, median of ``--repeats``), so a host whose speed drifts affects all of them alike.
Writes ``bench/results/pretrain_step.json``; BENCHMARKS.md ("Pretraining the tiny base") cites it. Used to ask
whether the default 2400-step recipe can finish in 15 minutes on 2 cores without changing the recipe.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS_DIR, machine_info, write_json  # noqa: E402


def _setup(channels_last: bool, workdir: str, widths: list[int] | None = None):
    import torch

    from stamina_core.data.benchmark import ContinualBenchmark, to_tensor_range
    from stamina_core.models.bundle import build_tiny
    from stamina_core.pretrain import PretrainConfig, model_config

    cfg = PretrainConfig()
    if widths is not None:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"block_out_channels": list(widths)})})
    bench = ContinualBenchmark(cfg.benchmark)
    x_u8, captions, _ = bench.pretrain_data()
    images = to_tensor_range(x_u8)
    b = build_tiny(model_config(cfg, captions), workdir=workdir)
    unet, te = b.unet, b.text_encoder
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    uniq = sorted(set(captions)) + [""]
    ids = b.tokenize(uniq)
    opt = torch.optim.AdamW([{"params": list(unet.parameters())}, {"params": list(te.parameters())}],
                            lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    return images, unet, te, ids, len(uniq), opt, b.noise_scheduler


def measure(threads: list[int], batches: list[int], repeats: int, compile_: bool, workdir: str,
            formats: tuple[bool, ...] = (False, True), widths: list[list[int]] | None = None) -> list[dict]:
    import torch
    import torch.nn.functional as F

    variants = []
    setups = [(w_i, w, cl) for w_i, w in enumerate(widths or [None]) for cl in formats]
    for w_i, w, cl in setups:
        images, unet, te, ids, n_caps, opt, ns = _setup(cl, os.path.join(workdir, f"w{w_i}cl{int(cl)}"), w)
        w_used = list(unet.config.block_out_channels)

        def fwd(noisy, t, idb, noise, unet=unet, te=te):
            return F.mse_loss(unet(noisy, t, encoder_hidden_states=te(idb)[0]).sample, noise)

        fns = [("eager", fwd)]
        if compile_ and not cl:
            fns.append(("compiled", torch.compile(fwd)))
        for name, fn in fns:
            for th in threads:
                for bs in batches:
                    variants.append({"threads": th, "batch": bs, "channels_last": cl, "mode": name, "fn": fn,
                                     "opt": opt, "images": images, "ids": ids, "n_caps": n_caps, "ns": ns,
                                     "widths": w_used, "unet_params": sum(p.numel() for p in unet.parameters()),
                                     "times": [], "first_s": None})

    def step(v, i):
        g = torch.Generator().manual_seed(i)
        bs = v["batch"]
        idx = torch.randint(0, len(v["images"]), (bs,), generator=g)
        x = v["images"][idx]
        if v["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, v["ns"].config.num_train_timesteps, (bs,), generator=g)
        cid = torch.randint(0, v["n_caps"], (bs,), generator=g)
        torch.set_num_threads(v["threads"])
        t0 = time.perf_counter()
        loss = v["fn"](v["ns"].add_noise(x, noise, t), t, v["ids"][cid], noise)
        v["opt"].zero_grad(set_to_none=True)
        loss.backward()
        v["opt"].step()
        return time.perf_counter() - t0

    for v in variants:  # warm-up (and compilation, timed)
        v["first_s"] = step(v, 0)
        for i in range(1, 3):
            step(v, i)
    from tqdm.auto import tqdm

    for i in tqdm(range(repeats), desc="rounds", unit="round"):
        for v in variants:
            v["times"].append(step(v, 100 + i))
    out = []
    for v in variants:
        med = statistics.median(v["times"])
        out.append({"mode": v["mode"], "channels_last": v["channels_last"], "threads": v["threads"], "batch": v["batch"],
                    "widths": v["widths"], "unet_params": v["unet_params"],
                    "median_s": round(med, 4), "per_sample_ms": round(1000 * med / v["batch"], 2),
                    "first_step_s": round(v["first_s"], 2), "repeats": len(v["times"])})
    return out


def table(rows: list[dict], steps: int, batch: int) -> str:
    many = len({tuple(r.get("widths") or ()) for r in rows}) > 1
    lines = ["| mode | memory format | " + ("UNet widths | UNet params | " if many else "") +
             "threads | batch | s/step (median) | ms/sample | first step (s) | "
             f"{steps} steps at batch {batch} (min) |", "|---|---|" + ("---|---:|" if many else "") +
             "---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        full = f"{steps * r['median_s'] / 60:.1f}" if r["batch"] == batch else "-"
        w = f"{','.join(map(str, r['widths']))} | {r['unet_params']:,} | " if many else ""
        lines.append(f"| {r['mode']} | {'channels_last' if r['channels_last'] else 'NCHW'} | {w}{r['threads']} | {r['batch']} | "
                     f"{r['median_s']:.3f} | {r['per_sample_ms']:.1f} | {r['first_step_s']:.1f} | {full} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--batches", default="32,16,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (each times every variant once)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the forward (NCHW only)")
    p.add_argument("--formats", default="nchw,channels_last", help="comma-separated memory formats: nchw, channels_last")
    p.add_argument("--widths", default=None,
                   help="semicolon-separated UNet block_out_channels to compare, e.g. '32,64,64;24,48,48' "
                        "(default: the PretrainConfig default only)")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "pretrain_step.json"))
    a = p.parse_args(argv)
    try:
        threads = [int(x) for x in a.threads.split(",") if x.strip()]
        batches = [int(x) for x in a.batches.split(",") if x.strip()]
    except ValueError:
        raise SystemExit("--threads/--batches: expected comma-separated integers")
    if not threads or not batches or min(threads + batches) < 1 or a.repeats < 1:
        raise SystemExit("--threads, --batches and --repeats need positive values")
    fmt_names = [x.strip() for x in a.formats.split(",") if x.strip()]
    bad = [x for x in fmt_names if x not in ("nchw", "channels_last")]
    if bad or not fmt_names:
        raise SystemExit(f"--formats: expected nchw and/or channels_last, got {a.formats!r}")
    formats = tuple(x == "channels_last" for x in fmt_names)
    widths = None
    if a.widths is not None:
        try:
            widths = [[int(c) for c in part.split(",")] for part in a.widths.split(";") if part.strip()]
        except ValueError:
            raise SystemExit(f"--widths: expected e.g. '32,64,64;24,48,48', got {a.widths!r}")
        from stamina_core.models.config import TinyModelConfig
        from pydantic import ValidationError

        for w in widths:
            try:
                TinyModelConfig(block_out_channels=w)
            except ValidationError as e:
                raise SystemExit(f"--widths {w}: {e.errors()[0]['msg']}")
    import tempfile

    from stamina_core.pretrain import PretrainConfig

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(threads, batches, a.repeats, a.compile, tmp, formats, widths)
    cfg = PretrainConfig()
    body = table(rows, cfg.max_train_steps, cfg.train_batch_size)
    print(body)
    write_json(a.out, {"command": "python bench/pretrain_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "rows": rows, "default_steps": cfg.max_train_steps, "default_batch": cfg.train_batch_size,
                       "wall_s": round(time.perf_counter() - t0, 1), "machine": machine_info()})
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
