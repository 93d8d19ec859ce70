"""Captions the base's tokenizer cannot carry whole: read once at data setup, warned once.

Two ways a caption silently becomes another one:
- a word outside a closed vocabulary: the tiny world's tokenizer keeps only its own words' BPE
  merges, so `crimson` becomes `c ri m s on`, pieces its text encoder never saw as a word.
  CLIP's full vocabulary (SD bases) spells any word with sub-words its encoder was trained on,
  so there the check is off;
- a character outside it (an emoji, a symbol like ™): the byte-level BPE spells it as UTF-8
  byte pieces (😀 becomes `ð Ł ĺ Ģ`), no word at all; CLIP's full vocabulary holds the common
  emoji as tokens it trained on, so there this check is off too;
- a caption longer than the text encoder's context (tiny: 32 tokens, CLIP: 77) loses its end.
A caption of whitespace only tokenizes to nothing: it is an empty caption (the data check counts
it as one), not checked here.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Iterable

FULL_CLIP_VOCABULARY = 49408  # OpenAI CLIP's BPE vocabulary (SD 1.x/2.x tokenizers)
SHOWN = 5  # examples per warning
WORD = re.compile(r"[^\W\d_]+")  # a run of letters: CLIP's pre-tokenizer's word unit
NOT_WORD = re.compile(r"[^\W\d_]|\s")  # letters (words) and whitespace: left to the others


def _pieces(tokenizer, word: str) -> list[str]:
    return [p.replace("</w>", "") for p in tokenizer.tokenize(word)]


def _garbled(tokenizer, captions: list[str], units) -> tuple[int, Counter, dict]:
    """(captions affected, unit -> captions using it, unit -> its pieces) for the units of each
    caption (`units(caption)`: its words, or its characters outside words) that the tokenizer
    cannot keep as one token; each unit is tokenized once."""
    pieces: dict[str, list[str]] = {}
    uses: Counter = Counter()
    affected = 0
    for caption in captions:
        found = set()
        for unit in units(caption):
            if unit not in pieces:
                pieces[unit] = _pieces(tokenizer, unit)
            if len(pieces[unit]) > 1:
                found.add(unit)
        uses.update(found)
        affected += bool(found)
    return affected, uses, pieces


def _unknown_words(tokenizer, captions: list[str]) -> str | None:
    """Words the tokenizer splits (one token each, not vocabulary membership: a lone Latin-1
    letter such as ² has a byte token of its own look but is two UTF-8 byte pieces)."""
    vocab = tokenizer.get_vocab()
    if len(vocab) >= FULL_CLIP_VOCABULARY:
        return None
    affected, uses, pieces = _garbled(tokenizer, captions,
                                      lambda caption: set(WORD.findall(caption.lower())))
    if not uses:
        return None
    shown = ", ".join(f"'{w}' ({n} caption{'s' * (n > 1)}, split into {' '.join(pieces[w])})"
                      for w, n in uses.most_common(SHOWN))
    return (f"captions: {affected} of {len(captions)} captions use {len(uses)} word(s) the base's "
            f"tokenizer does not know (its vocabulary has {len(vocab)} entries); it splits them "
            f"into pieces its text encoder never learned as words: {shown}"
            f"{' ...' if len(uses) > SHOWN else ''}. Such captions train on a garbled text "
            "condition: use words in its vocabulary (the tiny world's colours, shapes and "
            "cnexp/tinyworld/tokenizer.py's EXTRA_WORDS), or a bigger base with CLIP's full "
            "tokenizer (e.g. base=sd15)")


def _unrepresented(tokenizer, captions: list[str]) -> str | None:
    """Characters outside words (WORD's letters are _unknown_words') that the tokenizer can only
    spell as byte pieces: its one-character tokens are the 256 bytes, so anything it holds as a
    unit is one token."""
    if len(tokenizer.get_vocab()) >= FULL_CLIP_VOCABULARY:
        return None
    affected, uses, pieces = _garbled(tokenizer, captions,
                                      lambda caption: set(NOT_WORD.sub("", caption)))
    if not uses:
        return None
    shown = ", ".join(f"'{c}' ({n} caption{'s' * (n > 1)}, {len(pieces[c])} byte pieces "
                      f"{' '.join(pieces[c])})" for c, n in uses.most_common(SHOWN))
    return (f"captions: {affected} of {len(captions)} captions use {len(uses)} character(s) the "
            f"base's tokenizer cannot represent (emoji, symbols): it spells each as UTF-8 byte "
            f"pieces, no word its text encoder learned: {shown}"
            f"{' ...' if len(uses) > SHOWN else ''}. Such captions train on a garbled text "
            "condition: write the word instead (e.g. 'star' for ⭐), drop the character, or use "
            "a base with CLIP's full tokenizer (e.g. base=sd15)")


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
    captions = [c for c in captions if c.strip()]  # whitespace only: an empty caption
    if not captions:
        return []
    quiet = logging.getLogger("transformers")  # its own "longer than the maximum" note: ours
    level = quiet.level                         # says it with counts and the fix
    quiet.setLevel(logging.ERROR)
    try:
        found = (_unknown_words(tokenizer, captions), _unrepresented(tokenizer, captions),
                 _overlong(tokenizer, captions))
    finally:
        quiet.setLevel(level)
    return [m for m in found if m]


def tokenizer_lines(cfg, checked) -> list[str]:
    """The data check's tokenizer lines for the captions it kept (`python -m cnexp.data.check`)."""
    try:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(cfg.base.pretrained, subfolder="tokenizer",
                                                  revision=cfg.base.revision,
                                                  local_files_only=True)  # never a download
    except Exception as err:  # not cached, missing folder: the rest of the report stands
        return [f"  tokenizer   not checked ({cfg.base.pretrained}: {type(err).__name__})"]
    captions, seen = [], set()
    for split, indices in checked.indices.items():
        source = checked.sources[split]
        for index in indices:
            if (id(source), index) not in seen:
                seen.add((id(source), index))
                captions += source.captions(index)
    found = caption_warnings(tokenizer, captions)
    return [f"  tokenizer   {message}" for message in found] or [
        f"  tokenizer   every caption fits the base's {tokenizer.model_max_length}-token "
        "context" + (" and vocabulary" if len(tokenizer.get_vocab()) < 49408 else "")]
