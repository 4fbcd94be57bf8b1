"""One training job, whatever its kind (expert, monolith, router, distilled student): its spec and its
checks against the store (``job``), the budget that matches the ensemble's FLOPs with the
monoliths' (``budget``), the loop (``trainer``, with ``engine``, ``objectives``, ``ema``,
``prefetch``, ``resume``, ``checks``, ``uploads``, ``board``) and its export (``export``).
``python -m ddm.train`` runs one job without Ray.

May import: core, store, distributed, checkpoint, models, data, ensemble.
"""
