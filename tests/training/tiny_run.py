"""The experiment TOML of the fault and preemption launches: a 3-level U-Net of width 4 on 2 stages, no
validation, a metrics line every step."""
from __future__ import annotations


def experiment(checkpoint_every: int) -> str:
    return f"""
[data]
patch = [32, 32, 16]
[model]
name = "unet3d"
params = {{ levels = 3, base_width = 4, max_width = 16, convs_per_level = 1 }}
[train]
stages = 2
val_every = 0
checkpoint_every = {checkpoint_every}
log_every = 1
"""
