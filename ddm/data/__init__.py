"""Data: ingest into sharded object storage, features, semantic partitioning, partition readers."""
