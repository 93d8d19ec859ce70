"""Captions the base's tokenizer cannot carry whole: read once at data setup, warned once.

Two ways a caption silently becomes another one:
- a word outside a closed vocabulary: the tiny world's tokenizer keeps only its own words' BPE
  merges, so `crimson` becomes `c ri m s on`, pieces its text encoder never saw as a word.
  CLIP's full vocabulary (SD bases) spells any word with sub-words its encoder was trained on,
  so there the check is off;
- a caption longer than the text encoder's context (tiny: 32 tokens, CLIP: 77) loses its end.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Iterable

FULL_CLIP_VOCABULARY = 49408  # OpenAI CLIP's BPE vocabulary (SD 1.x/2.x tokenizers)
SHOWN = 5  # examples per warning
WORD = re.compile(r"[^\W\d_]+")  # a run of letters: CLIP's pre-tokenizer's word unit


def _pieces(tokenizer, word: str) -> list[str]:
    return [p.replace("</w>", "") for p in tokenizer.tokenize(word)]


def _unknown_words(tokenizer, captions: list[str]) -> str | None:
    vocab = tokenizer.get_vocab()
    if len(vocab) >= FULL_CLIP_VOCABULARY:
        return None
    uses: Counter = Counter()  # unknown word -> captions using it
    affected = 0
    for caption in captions:
        unknown = {w for w in WORD.findall(caption.lower()) if w + "</w>" not in vocab}
        uses.update(unknown)
        affected += bool(unknown)
    if not uses:
        return None
    shown = ", ".join(f"'{w}' ({n} caption{'s' * (n > 1)}, split into "
                      f"{' '.join(_pieces(tokenizer, w))})" for w, n in uses.most_common(SHOWN))
    return (f"captions: {affected} of {len(captions)} captions use {len(uses)} word(s) the base's "
            f"tokenizer does not know (its vocabulary has {len(vocab)} entries); it splits them "
            f"into pieces its text encoder never learned as words: {shown}"
            f"{' ...' if len(uses) > SHOWN else ''}. Such captions train on a garbled text "
            "condition: use words in its vocabulary (the tiny world's colours, shapes and "
            "cnexp/tinyworld/tokenizer.py's EXTRA_WORDS), or a bigger base with CLIP's full "
            "tokenizer (e.g. base=sd15)")


def _overlong(tokenizer, captions: list[str]) -> str | None:
    limit = tokenizer.model_max_length
    lengths = {c: len(tokenizer.tokenize(c)) + 2 for c in set(captions)}  # + start, end tokens
    cut = [c for c in captions if lengths[c] > limit]
    if not cut:
        return None
    longest = max(cut, key=lengths.get)
    example = longest if len(longest) <= 120 else longest[:117] + "..."
    return (f"captions: {len(cut)} of {len(captions)} captions are longer than the base's "
            f"{limit}-token context and lose their end to truncation (longest: "
            f"{lengths[longest]} tokens, '{example}'): shorten them, or use a base with a "
            "longer context (CLIP of SD bases: 77 tokens)")


def caption_warnings(tokenizer, captions: Iterable[str]) -> list[str]:
    """One message per problem found in `captions` (each caption counted once per use)."""
    captions = [c for c in captions if c]
    if not captions:
        return []
    quiet = logging.getLogger("transformers")  # its own "longer than the maximum" note: ours
    level = quiet.level                         # says it with counts and the fix
    quiet.setLevel(logging.ERROR)
    try:
        found = (_unknown_words(tokenizer, captions), _overlong(tokenizer, captions))
    finally:
        quiet.setLevel(level)
    return [m for m in found if m]
