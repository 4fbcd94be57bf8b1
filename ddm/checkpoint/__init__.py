"""Exact resume from any fsspec store: full-state checkpoints of a training job, safetensors and
JSON only, uploaded in the background and committed by a manifest (``manager``); training state that
does not depend on the worker count, so a job resumes on M workers from N (``reshard``); commits of
ddm before format 3 read without running code (``legacy``); local scratch for snapshots
(``scratch``).

May import: core, store, distributed.
"""
