"""The analysis program: reads the records runs leave (cnexp/run/record.py) and never trains.

runs.py reads a sweep (or a W&B group) into RunRecords; stats.py holds the small-sample
statistics; compare.py writes the report (`python -m cnexp.analysis.compare <sweep dir>`);
claims.py judges the paper's claims; plots.py draws the figures.
"""
