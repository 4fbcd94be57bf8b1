"""How good an ensemble is against its baselines: evaluation (``evaluate``, its settings in
``settings``), the distances and classifiers it measures with (``metrics``), prompt adherence of
text ensembles (``adherence``), learning curves over training (``curves``) and the run's report
(``report``).

May import: core, store, distributed, models, data, ensemble, train.
"""
