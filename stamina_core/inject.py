"""Attach adapters to target modules by name pattern, and find them again.

A pattern matches a ``nn.Linear`` whose qualified name equals it or ends with ``"." + pattern``
(``attn2.to_k`` matches ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``), or, when
it starts with ``re:``, whose name matches the regular expression after the prefix. A pattern that
matches nothing is an error listing the Linear layers that exist.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from torch import nn

from .adapters.layers import LoRALinear
from .errors import AttachError


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _suffixes(names: Iterable[str]) -> list[str]:
    """Short, distinct name endings (two components) to suggest as patterns."""
    out = sorted({".".join(n.split(".")[-2:]) for n in names})
    return out


def match_targets(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Qualified names of the Linear layers matched by ``patterns`` (each pattern must match)."""
    names = linear_names(model)
    chosen: list[str] = []
    for p in patterns:
        hit = [n for n in names if _matches(n, p)]
        if not hit:
            avail = _suffixes(names)
            shown = ", ".join(avail[:40]) + (" ..." if len(avail) > 40 else "")
            raise AttachError(
                f"adapter.targets: pattern {p!r} matches no nn.Linear in {type(model).__name__}; "
                f"available layer names end with: {shown}"
            )
        chosen.extend(h for h in hit if h not in chosen)
    return chosen


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def attach(
    model: nn.Module, patterns: Iterable[str], factory: Callable[[str, nn.Linear], LoRALinear]
) -> dict[str, LoRALinear]:
    """Replace each matched Linear by ``factory(name, linear)``; return {name: adapter}.

    Refuses to wrap a layer that already carries an adapter (fold the previous concept first).
    """
    existing = adapters_of(model)
    if existing:
        raise AttachError(
            f"model already carries {len(existing)} adapter(s) (e.g. {next(iter(existing))}); "
            "fold or remove them before attaching the next concept"
        )
    names = match_targets(model, patterns)
    out: dict[str, LoRALinear] = {}
    for name in names:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        ad = factory(name, base)
        setattr(parent, child, ad)
        out[name] = ad
    return out


def adapters_of(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def detach(model: nn.Module, adapters: dict[str, LoRALinear]) -> None:
    """Put the original Linear modules back (no weight change)."""
    for name, ad in adapters.items():
        parent, child = _parent(model, name)
        if getattr(parent, child) is ad:
            setattr(parent, child, ad.base)
