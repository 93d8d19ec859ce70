"""A CLIP tokenizer cut down to the tiny world's words, from the real CLIP BPE merges.

open-clip-torch ships the BPE merge list of OpenAI's CLIP. Keeping only the merges that the
tiny world's words use (in their original order) gives exactly the real CLIP split of those words
with a vocabulary of ~600 instead of 49408 entries, which keeps the text encoder small.
Words outside the list still tokenize, as byte-level characters.
"""
from __future__ import annotations

import gzip
import re

from transformers import CLIPTokenizer

from cnexp.tinyworld.shapes import COLOURS, SHAPES

EXTRA_WORDS = ("a an and on of the in with background image photo picture drawing shape shapes "
               "high quality detailed professional left right top bottom small large big").split()
MAX_LENGTH = 32


def _clip_merges() -> list[tuple[str, str]]:
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """Run CLIP's greedy BPE on one word and return the merges it applied."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    used = set()
    while len(symbols) > 1:
        pairs = [(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.add(best)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


def build_tiny_tokenizer(extra_words: tuple[str, ...] = ()) -> CLIPTokenizer:
    from open_clip.tokenizer import bytes_to_unicode

    merges = _clip_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    words = set(COLOURS) | set(SHAPES) | set(EXTRA_WORDS) | set(extra_words)
    used: set[tuple[str, str]] = set()
    for w in words:
        for piece in re.findall(r"[a-z]+", w.lower()):
            used |= _bpe_merges_used(piece, ranks)
    kept = [m for m in merges if m in used]  # original rank order
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in kept]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=kept,
                         model_max_length=MAX_LENGTH)
