"""Data: ingest into sharded object storage, features, semantic partitioning, partition readers, on Ray
Data or in one process. It runs on its own, on any Ray cluster: no launcher, no training.

May import: core, store, distributed, models.
"""
