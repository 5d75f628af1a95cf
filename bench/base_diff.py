"""How far apart two saved tiny bases are: relative Frobenius distance and max |Δw| per component.

    python bench/base_diff.py ~/.cache/stamina/pretrained/tiny-f4f0e6d5b69f /tmp/pt/tiny-<key>

Used for BENCHMARKS.md ("Threads change the weights"): the 1-thread and the 2-thread pretraining of the same
config. Reads safetensors only.
"""

from __future__ import annotations

import argparse
import os
import sys

COMPONENTS = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def diff(a_dir: str, b_dir: str) -> dict[str, dict[str, float]]:
    from safetensors.torch import load_file

    out = {}
    for rel in COMPONENTS:
        pa, pb = os.path.join(a_dir, rel), os.path.join(b_dir, rel)
        for p in (pa, pb):
            if not os.path.isfile(p):
                raise SystemExit(f"{p}: not found (expected a saved tiny base folder)")
        a, b = load_file(pa), load_file(pb)
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise SystemExit(f"{rel}: the two bases have different tensors; not the same architecture")
        num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
        den = sum(float(a[k].double().pow(2).sum()) for k in a) ** 0.5
        mx = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        out[rel.split("/")[0]] = {"rel_fro": num / den if den else float("nan"), "max_abs": mx}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    for comp, d in diff(args.a, args.b).items():
        print(f"{comp}: relative Frobenius distance {d['rel_fro']:.2e}, max |dw| {d['max_abs']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
