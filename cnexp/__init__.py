"""cnexp: ControlNet ablations on Hydra, Lightning and diffusers (README.md).

Importing it installs the list of known third-party warnings a run does not print, before any
of those libraries loads (cnexp/quiet.py; docs/evaluation.md, "What a run prints").
"""
from cnexp.quiet import install as _install_quiet

_install_quiet()
