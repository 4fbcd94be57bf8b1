"""``ddm demo``: the whole method on a 2-D Gaussian mixture in one process, in a minute
(``mixture``; its settings in ``config``, which imports no torch).

May import: core, models, ensemble, train, eval.
"""
