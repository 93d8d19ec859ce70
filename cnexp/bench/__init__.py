"""The benchmark program: cnexp's training throughput beside diffusers' train_controlnet.py.

`python -m cnexp.bench` (tiny.py: the tiny world, both trainers as subprocesses), `--sd 15|21`
(sd.py: an SD-shaped model with random weights, sd_shapes.py), FLOPs per step (flops.py) and the
peak-memory wrapper the subprocesses run under (peak.py). docs/performance.md, docs/gpu.md.
"""
