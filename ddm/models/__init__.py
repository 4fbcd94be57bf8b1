"""Networks and what they learn: DiT experts and routers (class or text conditioned, MMDiT too), MLPs
for low-dimensional data, MoE feed-forward layers, text encoders; the flow-matching path they are
trained on (``flow``); the weights they start from (``pretrained``) and end as (``exports``).

``ddm.models.config`` (re-exported here) says what a model is without importing torch;
``ddm.models.build`` makes it. Every model is called as ``model(x, t, y)`` with x of shape
``(N, *data_shape)``, t of shape ``(N,)`` in [0, 1] and y of shape ``(N,)`` (class labels,
``null_label`` for "no class") or None.

May import: core, store, distributed.
"""

from ddm.models.config import DIT_SIZES, MLP_SIZES, FlowConfig, ModelConfig, MoEConfig, forward_flops

__all__ = ["DIT_SIZES", "MLP_SIZES", "FlowConfig", "ModelConfig", "MoEConfig", "forward_flops"]
