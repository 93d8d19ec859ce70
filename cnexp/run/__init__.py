"""A run: its directory, lock and snapshot, the record it writes, its checkpoints, how it
starts (resume, warm start, fresh) and how it stops. docs/architecture.md draws the map."""
