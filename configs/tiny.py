r"""A tiny FiTv2 (2 blocks, D=64, 4 heads) with the full FiTv2 structure, for tests and CPU smoke runs.

Command (any CPU, seconds):
  python -m fitv2_jax.models.summary --config configs/tiny.py
Hardware: a laptop CPU. Reproduces: nothing published; every code path of FiTv2-XL/2 at toy size.
"""

from fitv2_jax.config.defaults import base_config, fitv2_model


def get_config():
    config = base_config()
    config.model = fitv2_model(hidden_size=64, depth=2, num_heads=4, num_classes=10)
    return config
