"""The benchmark program: cnexp's training throughput beside diffusers' train_controlnet.py.

`python -m cnexp.bench` (cli.py; tiny.py: the tiny world, both trainers as subprocesses),
`--sd 15|21` (sd.py: an SD-shaped model with random weights, sd_shapes.py), `--loader` (loader.py:
the data path alone), FLOPs per step (flops.py); common.py holds what the modes share, child.py
the wrapper the trainers run under (the in-process step clock, peak GPU memory).
docs/performance.md, docs/gpu.md.
"""
