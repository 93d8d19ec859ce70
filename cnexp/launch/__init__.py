"""What happens before and around runs: sweeps, the SLURM job, the plan (what a run or sweep
will cost and whether it fits). docs/architecture.md draws the map."""
