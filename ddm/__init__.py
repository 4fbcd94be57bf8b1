"""ddm trains Decentralized Diffusion Models (McAllister et al., CVPR 2025).

The data is split into K semantic partitions; one expert flow-matching model is
trained per partition, each in full isolation (its own job, its own cluster); a
small router learns p(partition | x_t, t, c); at sampling time the router combines
the experts. With every expert weighted by the router's posterior ("full") this is
exactly the flow of one model trained on all the data; "top-1" (the default) runs
one expert per sample and step.

  data ─► partitions ─► expert 0 … expert K-1 (isolated) ─┐
                   └──► router ────────────────────────────┴─► ensemble ─► samples
"""

__version__ = "0.2.0"
