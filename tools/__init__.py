"""Tools beside cnexp, not part of the installed package: `python -m tools.localslurm`."""
