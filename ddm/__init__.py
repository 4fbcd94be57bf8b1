"""ddm: train Decentralized Diffusion Models (McAllister et al., CVPR 2025).

K expert flow-matching models, each trained in isolation on one semantic partition of the
data, combined at sampling time by a router that predicts p(partition | x_t, t, c).
"""

__version__ = "0.1.0"
