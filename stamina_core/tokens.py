"""Concept tokens ``<c_t>``.

The new token is added to the tokenizer and one row is appended to the text encoder's token table.
During training the table stays frozen: a ``ConceptEmbedding`` wrapper looks rows up as usual and
substitutes the new token's vector, which comes from

* ``MLPTokenSource`` (STAMINA): ``e_t = MLP_t(z_t)`` with a fixed seeded code ``z_t`` and a two-layer
  GELU MLP (d -> h -> d), rescaled to a target norm; or
* ``DirectTokenSource`` (baselines): a free learned row.

So old rows are bit-identical by construction. Folding writes ``e_t`` into the table and puts the
original ``nn.Embedding`` back (the MLP and its code are discarded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TokenConfig
from .errors import FoldError, TokenError


class MLPTokenSource(nn.Module):
    def __init__(self, dim: int, hidden: int, code_dim: int, target_norm: float | None, seed: int, init: torch.Tensor):
        super().__init__()
        code_dim = code_dim or dim
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("z", torch.randn(code_dim, generator=g), persistent=True)
        self.fc1 = nn.Linear(code_dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        with torch.no_grad():
            for lin in (self.fc1, self.fc2):
                bound = 1.0 / (lin.in_features**0.5)
                lin.weight.copy_(torch.rand(lin.weight.shape, generator=g) * 2 * bound - bound)
                lin.bias.zero_()
            # Start at the init word: the output bias carries it, the MLP learns the offset.
            self.fc2.bias.copy_(init.float())
            self.fc2.weight.mul_(0.1)
        self.target_norm = target_norm

    def forward(self) -> torch.Tensor:
        e = self.fc2(F.gelu(self.fc1(self.z)))
        if self.target_norm is not None:
            e = e * (self.target_norm / e.norm().clamp_min(1e-8))
        return e


class DirectTokenSource(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.row = nn.Parameter(init.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.row


class ConceptEmbedding(nn.Module):
    """Wraps a frozen ``nn.Embedding``; rows of ``token_id`` come from ``source()``."""

    def __init__(self, base: nn.Embedding, token_id: int, source: nn.Module):
        super().__init__()
        self.base = base
        self.token_id = int(token_id)
        self.source = source
        self.base.weight.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight in a few places (e.g. resize)
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        sel = input_ids == self.token_id
        if not bool(sel.any()):
            return out
        vec = self.source().to(out.dtype)
        return torch.where(sel.unsqueeze(-1), vec.expand_as(out), out)


def word_embedding(text_encoder: nn.Module, tokenizer, word: str) -> torch.Tensor:
    """Mean embedding of the tokens of ``word`` (no special tokens)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TokenError(f"token.init_word: {word!r} tokenizes to nothing")
    table = _table(text_encoder)
    return table.weight[torch.tensor(ids)].detach().float().mean(0)


def _table(text_encoder: nn.Module) -> nn.Embedding:
    emb = text_encoder.get_input_embeddings()
    if isinstance(emb, ConceptEmbedding):
        return emb.base
    return emb


def add_concept_token(
    tokenizer, text_encoder: nn.Module, token: str, cfg: TokenConfig, seed: int = 0
) -> ConceptEmbedding | None:
    """Add ``token`` to the tokenizer and table, and install a trainable source for its row.

    Returns the ``ConceptEmbedding`` (or None for ``kind='none'``). Adding a token that already
    exists is an error (each concept must be new).
    """
    if cfg.kind == "none":
        return None
    if not token or any(ch.isspace() for ch in token):
        raise TokenError(f"concept token {token!r}: must be a non-empty string without spaces, e.g. '<c7>'")
    if token in tokenizer.get_vocab():
        raise TokenError(f"concept token {token!r} already exists in the tokenizer; pick a new token")
    if isinstance(text_encoder.get_input_embeddings(), ConceptEmbedding):
        raise TokenError("a concept token is already being trained; fold it before adding another")
    init = word_embedding(text_encoder, tokenizer, cfg.init_word)
    table = _table(text_encoder)
    if cfg.norm == "init_word":
        target = float(init.norm())
    elif cfg.norm == "vocab_mean":
        target = float(table.weight.detach().float().norm(dim=1).mean())
    else:
        target = None

    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if ids != [token_id]:
        raise TokenError(f"concept token {token!r} does not tokenize to a single id ({ids})")
    n_new = len(tokenizer)
    if n_new > table.num_embeddings:
        text_encoder.resize_token_embeddings(n_new, mean_resizing=False)
        table = text_encoder.get_input_embeddings()
        with torch.no_grad():
            table.weight[token_id:] = init.to(table.weight.dtype)  # deterministic, no random rows
    if cfg.kind == "mlp":
        src = MLPTokenSource(table.embedding_dim, cfg.hidden, cfg.code_dim, target, seed, init)
    else:
        src = DirectTokenSource(init)
    src.to(table.weight.device)
    wrapper = ConceptEmbedding(table, token_id, src)
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


@torch.no_grad()
def token_row(wrapper: ConceptEmbedding) -> torch.Tensor:
    return wrapper.source().detach().float()


def fold_token(text_encoder: nn.Module, wrapper: ConceptEmbedding) -> torch.Tensor:
    """Write the token's vector into the table and remove the wrapper. Returns the row (fp32)."""
    if text_encoder.get_input_embeddings() is not wrapper:
        raise FoldError("token already folded (the text encoder no longer carries this concept's embedding)")
    row = token_row(wrapper)
    if not torch.isfinite(row).all():
        raise FoldError(f"token row for id {wrapper.token_id} has NaN/Inf; refusing to fold (table untouched)")
    with torch.no_grad():
        wrapper.base.weight[wrapper.token_id] = row.to(wrapper.base.weight.dtype)
    text_encoder.set_input_embeddings(wrapper.base)
    return row
