"""Processes and ranks: the process group, ``ParallelState`` (data and expert parallel axes) and
DeepSpeed's loading (``parallel``), and the Ray runtime a command works in: a local one or a
cluster's, Ray Train's trainer and its environment (``ray_runtime``).

May import: core.
"""
