"""Launchers: how jobs reach Ray.

- ``ray_job``: one training job on one Ray cluster (Ray Train places and restarts its workers);
- ``run``: ``ddm run``, every stage of a run spec, its training jobs concurrent on one Ray cluster;
- ``islands``: ``ddm submit`` / ``status`` / ``resume``, one Ray job per expert across clusters.

``spec`` holds the run spec that ``ddm run`` and ``ddm submit`` share and the jobs it makes.

May import: core, store, distributed, models, data, ensemble, train, eval.
"""
