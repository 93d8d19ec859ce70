"""The family mode's bundle: the family's tiny random bundle as diffusers' scripts can read it,
with the same work for cnexp and for the script (families.py).

The tiny SD3 and Flux bundles hold the tiny world's CLIP tokenizer in their T5 slot (no T5
tokenizer is available offline). train_controlnet_sd3.py loads that slot as T5TokenizerFast,
which a CLIP tokenizer's files are not; train_controlnet_flux.py pads T5 prompts to 512 tokens
(FluxPipeline.encode_prompt's default) where cnexp pads to the slot's model_max_length (32 in
the tiny bundle), so the script would attend over 16x as many text tokens. The bench's bundle
links every part of the family's bundle except that slot, which holds a T5TokenizerFast over the
same vocabulary (the same size, so every id fits the tiny T5's embedding), with Flux's 512-token
maximum; model_index.json names the class. train_controlnet_sd3.py also pads CLIP prompts to 77
tokens whatever the tokenizer says, past the tiny CLIPs' 32 positions: SD3's bench bundle has
its two CLIP encoders drawn again (seeded) with 77 positions, as diffusers' own tiny SD3 test
pipeline has, and their tokenizers' maximum 77. cnexp and the script both train on it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# family -> (the T5 tokenizer's slot, its model_max_length)
T5_SLOTS = {"sd3": ("tokenizer_3", 256), "flux": ("tokenizer_2", 512)}
CLIP_TOKENS = {"sd3": 77}  # family -> the CLIP length its script pads to, past the tiny CLIPs'
CLIP_SLOTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2


def t5_tokenizer(clip_tokenizer, max_length: int):
    """A T5TokenizerFast (unigram, SentencePiece's word marker) whose pieces are the CLIP
    tokenizer's words, as many as the CLIP vocabulary holds, whole words scored above pieces."""
    from transformers import T5TokenizerFast

    pieces, seen = list(SPECIAL), set(SPECIAL)
    for token, _ in sorted(clip_tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token.startswith("<|"):  # CLIP's start and end marks
            continue
        piece = "\u2581" + token[:-len("</w>")] if token.endswith("</w>") else token
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    pieces = pieces[:len(clip_tokenizer)]
    vocab = [(piece, 0.0 if piece in SPECIAL else -float(10 - min(len(piece), 9)))
             for piece in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def bench_bundle(family: str, bundle: Path, work: Path) -> Path:
    """`bundle` itself where the scripts read it as it is (SDXL), else the linked copy with a
    T5 tokenizer in its T5 slot (see above)."""
    if family not in T5_SLOTS:
        return bundle
    from transformers import AutoTokenizer

    slot, max_length = T5_SLOTS[family]
    out = work / f"bundle-{family}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    index = json.loads((bundle / "model_index.json").read_text())
    redrawn = {slot}
    if family in CLIP_TOKENS:
        redrawn |= {name for pair in CLIP_SLOTS for name in pair}
        longer_clips(bundle, out, index, CLIP_TOKENS[family])
    for part in bundle.iterdir():
        if part.is_dir() and part.name not in redrawn:
            os.symlink(part.resolve(), out / part.name)
    clip = AutoTokenizer.from_pretrained(bundle, subfolder=slot)
    t5_tokenizer(clip, max_length).save_pretrained(out / slot)
    index[slot] = ["transformers", "T5TokenizerFast"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def longer_clips(bundle: Path, out: Path, index: dict, positions: int) -> None:
    """The bundle's CLIP encoders with `positions` positions (weights drawn again, seeded) and
    their tokenizers' maximum `positions`, written under `out`."""
    import torch
    import transformers

    torch.manual_seed(0)
    for encoder, tokenizer in CLIP_SLOTS:
        kind = getattr(transformers, index[encoder][1])
        config = kind.config_class.from_pretrained(bundle / encoder)
        config.max_position_embeddings = positions
        kind(config).save_pretrained(out / encoder)
        words = transformers.AutoTokenizer.from_pretrained(bundle, subfolder=tokenizer)
        words.model_max_length = positions
        words.save_pretrained(out / tokenizer)
