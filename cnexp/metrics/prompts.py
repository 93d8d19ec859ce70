"""The paper's four prompt settings at inference (section 4.2, Fig. 8).

Each setting turns the evaluation set's captions into the prompts the sampler sees:
- none: the empty string, so the condition alone must carry the content;
- insufficient: one generic prompt that does not describe the content;
- conflicting: another sample's caption, with a fixed pairing (sample i gets the caption of
  sample i + shift), so every run is given the same conflicts;
- perfect: the sample's own caption.
"""
from __future__ import annotations

import logging

from cnexp.config import EvalConfig
from cnexp.errors import CnexpError
from cnexp.knobs import PromptSetting

log = logging.getLogger("cnexp")

SETTINGS = tuple(PromptSetting)  # the choices of eval.prompt_settings, in the paper's order
INSUFFICIENT_PROMPT = EvalConfig.insufficient_prompt  # the paper's example (the schema default)


def conflicting_prompts(captions: list[str], shift: int = 1) -> list[str]:
    """Caption i -> the caption of sample i + shift (wrapping around). Where that caption is
    the same text as sample i's own, the next different one is taken, so no prompt agrees
    with its condition by accident; if all captions are equal there is nothing to conflict."""
    n = len(captions)
    out = []
    for i, own in enumerate(captions):
        candidates = (captions[(i + shift + k) % n] for k in range(n))
        out.append(next((c for c in candidates if c != own), own))
    same = sum(a == b for a, b in zip(out, captions))
    if same:  # these "conflicting" prompts describe their own condition: the setting is diluted
        log.warning("eval: %d of %d conflicting prompts equal their sample's own caption (no "
                    "other caption differs from it), so they do not conflict; give the "
                    "validation samples distinct captions", same, n)
    return out


def prompt_settings(captions: list[str], settings: list[str] | tuple[str, ...] = SETTINGS,
                    insufficient_prompt: str = INSUFFICIENT_PROMPT,
                    conflict_shift: int = 1) -> dict[str, list[str]]:
    """Setting name -> one prompt per caption, in the order asked for."""
    if "conflicting" in settings and len(captions) < 2:  # a tiny data set: evaluate the rest
        log.warning("eval: the conflicting prompt setting needs at least 2 evaluation samples "
                    "(another sample's caption is the conflict); the evaluation set has %d, so "
                    "it is skipped. Give the validation split 2 or more samples (data.val_size, "
                    "data.val_fraction) to have it", len(captions))
        settings = [s for s in settings if s != "conflicting"]
    if "conflicting" in settings and conflict_shift % max(len(captions), 1) == 0:
        raise CnexpError(f"eval.conflict_shift={conflict_shift} pairs every sample with itself "
                         f"for {len(captions)} evaluation captions: use a shift that is not a "
                         "multiple of the evaluation set size (e.g. 1)")
    make = {"none": lambda: [""] * len(captions),
            "insufficient": lambda: [insufficient_prompt] * len(captions),
            "conflicting": lambda: conflicting_prompts(captions, conflict_shift),
            "perfect": lambda: list(captions)}
    return {str(s): make[s]() for s in settings}
