"""An offline CLIP tokenizer.

``build_byte_tokenizer`` writes a byte-level CLIP BPE vocabulary (the 256 byte symbols, each also
with the end-of-word marker, plus start/end tokens: 514 ids, no merges) and loads it with
``transformers.CLIPTokenizer``. It is the exact CLIP tokenizer algorithm with an empty merge list,
so real SD tokenizer folders load through the same class. No downloads.
"""

from __future__ import annotations

import json
import os

from transformers import CLIPTokenizer


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-unicode table of GPT-2 / CLIP."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_byte_vocab(directory: str) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["<|startoftext|>", "<|endoftext|>"]
    vpath, mpath = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vpath, "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(mpath, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return vpath, mpath


def build_byte_tokenizer(directory: str, model_max_length: int = 77, words: list[str] | tuple[str, ...] = ()) -> CLIPTokenizer:
    """The byte-level CLIP tokenizer, plus one id per entry of ``words`` (whole words only).

    ``words`` plays the role of real CLIP's merged word tokens ("dog</w>" is one id in SD's vocabulary):
    each is added as a single-word token, so ``"a photo of a digit three"`` encodes "digit" and "three"
    as one id each, while any other text still falls back to bytes. Saved and reloaded with the
    tokenizer folder like any added token.
    """
    from transformers import AddedToken

    vpath, mpath = write_byte_vocab(directory)
    tok = CLIPTokenizer(vpath, mpath, pad_token="<|endoftext|>", model_max_length=model_max_length)
    bad = [w for w in words if not w or w != w.strip().lower() or any(ch.isspace() for ch in w)]
    if bad:
        raise ValueError(f"words: {bad[0]!r} must be one lower-case word without spaces")
    if words:
        tok.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in words])
    return tok
