"""K experts and a router as one model: the combine rules (``rules``) and the combined velocity
(``combine``), assembly from the store's exports into ``ensemble.json`` (``assemble``), sampling
(``sample``, its settings in ``settings``), what sampling costs (``cost``), and the closed forms of
a Gaussian mixture that the rules are tested against (``analytic``).

May import: core, store, distributed, models.
"""
