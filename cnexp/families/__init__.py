"""Base families: how a kind of frozen text-to-image base loads, encodes prompts, is trained
against (noise schedule, target, timesteps), samples and exports. One module per family, its
class registered in family.py's FAMILIES; `base.family` picks one (sd: SD 1.5/2.1 and the tiny
world). docs/architecture.md: "add a base family"."""
