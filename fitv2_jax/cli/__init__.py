"""What the commands (fitv2_jax/*.py) share: flag groups with one name per idea, and `run`.

Only commands import this package; the library never does.
"""
