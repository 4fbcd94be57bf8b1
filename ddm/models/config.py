"""What a model is and what it learns, without torch: the settings a job spec, an export's
``config.json`` and an islands plan carry.

``ModelConfig`` names a preset network (a DiT size from a tiny debug size to XL/2, or an MLP for
low-dimensional data), the data shape and the conditioning; ``MoEConfig`` its optional MoE
feed-forward layers; ``FlowConfig`` the probability path whose velocity it learns. Importing this
module pulls in no torch, so launchers and job specs stay light; ``ddm.models.build`` makes the
networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ddm.models.text_config import (  # noqa: F401 (public here)
    MMDIT_SIZES,
    MMDiTSize,
    TextConfig,
    mmdit_forward_flops,
    mmdit_params,
    text_dit_forward_flops,
    text_dit_params,
)

# Models see t in [0, 1]; the sinusoidal embedding is tuned for integer-like timesteps
# (DiT uses 0..999), so t is scaled by this factor before embedding.
TIME_SCALE = 1000.0


@dataclass(frozen=True)
class DiTSize:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


# The DiT paper's grid (S/B/L/XL x patch 2/4/8), a tiny size for small data and tests, and a micro
# size for routers (DiT-Micro/4 on 8x8 digits costs ~5% of a DiT-Tiny/2 expert's forward, the
# paper's router is ~4% of an expert).
DIT_SIZES: dict[str, DiTSize] = {
    "DiT-Micro/2": DiTSize(depth=1, hidden_size=32, num_heads=2, patch_size=2),
    "DiT-Micro/4": DiTSize(depth=1, hidden_size=32, num_heads=2, patch_size=4),
    "DiT-Micro/8": DiTSize(depth=1, hidden_size=32, num_heads=2, patch_size=8),
    "DiT-Tiny/2": DiTSize(depth=2, hidden_size=64, num_heads=2, patch_size=2),
    "DiT-Tiny/4": DiTSize(depth=2, hidden_size=64, num_heads=2, patch_size=4),
    **{
        f"DiT-{name}/{p}": DiTSize(depth, hidden, heads, p)
        for name, (depth, hidden, heads) in {
            "S": (12, 384, 6),
            "B": (12, 768, 12),
            "L": (24, 1024, 16),
            "XL": (28, 1152, 16),
        }.items()
        for p in (2, 4, 8)
    },
}


@dataclass(frozen=True)
class MLPSize:
    hidden_size: int
    depth: int


MLP_SIZES: dict[str, MLPSize] = {
    "MLP-XS": MLPSize(hidden_size=32, depth=2),
    "MLP-S": MLPSize(hidden_size=128, depth=3),
    "MLP-M": MLPSize(hidden_size=256, depth=4),
    "MLP-L": MLPSize(hidden_size=512, depth=6),
}


@dataclass(frozen=True)
class MoEConfig:
    """MoE feed-forward settings of a DiT.

    num_experts: MoE experts per MoE layer (0 disables MoE).
    every: every ``every``-th block (counting from the last) uses an MoE feed-forward;
        1 makes all blocks MoE, 2 alternates dense and MoE as in GShard / Switch.
    top_k: experts per token, 1 or 2 (DeepSpeed's TopKGate supports these).
    ep_size: expert-parallel degree; must divide num_experts and the world size.
    capacity_factor: token capacity per expert relative to an even split; tokens beyond it are
        dropped (their feed-forward output is zero, the residual passes them through).
    aux_loss_coef: weight of the load-balancing loss added to the training objective.
    """

    num_experts: int = 0
    every: int = 2
    top_k: int = 1
    ep_size: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if not self.enabled:
            return
        if self.top_k not in (1, 2):
            raise ValueError(f"top_k must be 1 or 2 (DeepSpeed TopKGate), got {self.top_k}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide num_experts={self.num_experts}")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError("capacity_factor and eval_capacity_factor must be > 0")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class ModelConfig:
    """Which network and for what data.

    arch: a preset name, a DiT size ("DiT-Tiny/2" ... "DiT-XL/2") or an MLP size ("MLP-S", ...).
    data_shape: one sample's shape: (C, H, W) for a DiT, (D,) for an MLP.
    num_classes: 0 for unconditional models; otherwise labels 0..num_classes-1 and a null label.
    class_dropout_prob: label dropout during training, which classifier-free guidance needs
        (the DiT paper uses 0.1).
    time_freq_shift: the timestep embedding's frequencies are 10000^(-i / (128 - shift)),
        i < 128: 0 as in the DiT paper and its checkpoints, 1 as diffusers' DiTTransformer2DModel
        computes them. A DiT started from a diffusers model needs 1 (``init_from`` says so).
    learn_sigma: a DDPM expert's DiT also outputs, per channel, the interpolation v in [-1, 1]
        between log beta_t and log beta~_t of its reverse step's variance (improved DDPM, the DiT
        paper's experts): 2C output channels, trained by the variational bound beside the noise
        MSE. Sampling integrates the probability-flow ODE, which uses only the noise half; the
        variance is kept so a pretrained DiT's head is fine-tuned whole and exported as it was.
    """

    arch: str = "DiT-Tiny/2"
    data_shape: tuple[int, ...] = (4, 32, 32)
    num_classes: int = 0
    class_dropout_prob: float = 0.1
    mlp_ratio: float = 4.0
    moe: MoEConfig = field(default_factory=MoEConfig)
    time_freq_shift: int = 0
    learn_sigma: bool = False
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
        if isinstance(self.text, dict):  # as an export's config.json holds it
            object.__setattr__(self, "text", TextConfig(**self.text))
        if self.arch in MMDIT_SIZES and not self.text.enabled:
            raise ValueError(f"{self.arch} reads captions: set model.text (encoder, dim, length)")
        if self.arch in MMDIT_SIZES and self.moe.enabled:
            raise ValueError(f"{self.arch} has no MoE feed-forward yet: set moe.num_experts=0, or use a DiT")
        if self.text.enabled:
            if self.arch not in DIT_SIZES and self.arch not in MMDIT_SIZES:
                raise ValueError(f"a text-conditioned model is a DiT or an MMDiT; {self.arch} is not")
            if self.num_classes or self.learn_sigma or self.time_freq_shift:
                raise ValueError(
                    "a text-conditioned DiT takes captions instead of class labels: set num_classes=0; it has no "
                    "learn_sigma or time_freq_shift"
                )
        if self.time_freq_shift not in (0, 1):
            raise ValueError(f"time_freq_shift must be 0 (the DiT paper) or 1 (diffusers), got {self.time_freq_shift}")
        if self.arch in DIT_SIZES or self.arch in MMDIT_SIZES:
            if len(self.data_shape) != 3 or self.data_shape[1] != self.data_shape[2]:
                raise ValueError(f"data_shape must be (C, H, H) for {self.arch}, got {self.data_shape}")
            patch = dit_size(self.arch).patch_size
            if self.data_shape[1] % patch:
                raise ValueError(
                    f"data_shape side {self.data_shape[1]} is not divisible by the patch size {patch} of {self.arch}"
                )
        elif self.arch in MLP_SIZES:
            if len(self.data_shape) != 1:
                raise ValueError(f"data_shape must be (D,) for {self.arch}, got {self.data_shape}")
            if self.moe.enabled:
                raise ValueError(f"moe is only supported by DiT models, not {self.arch}")
            if self.time_freq_shift or self.learn_sigma:
                raise ValueError(f"time_freq_shift and learn_sigma are DiT settings, not {self.arch}'s")
        else:
            known = sorted(DIT_SIZES) + sorted(MMDIT_SIZES) + sorted(MLP_SIZES)
            raise ValueError(f"arch {self.arch!r} is unknown; choose one of {known}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")


PATHS = ("linear", "cosine", "vp")
PREDICTIONS = ("velocity", "epsilon")
TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun")  # the ODE solvers of ddm.models.flow.FlowMatching.sample


@dataclass(frozen=True)
class FlowConfig:
    """The probability path a model learns the velocity of, and how training draws t.

    path: "linear" (rectified flow, the default of SD3/SiT-style training), "cosine", or "vp":
        DDPM's variance-preserving schedule (the DiT paper's linear betas, 1e-4 to 0.02 over 1000
        steps, in continuous time: beta(t) = 0.1 + 19.9 t, alpha_bar(t) = exp(-0.1 t - 9.95 t^2)).
    prediction: what the network predicts: "velocity" (flow matching) or "epsilon" (the noise,
        as DDPM: with path "vp" a DDPM expert). An ensemble converts every expert's prediction to
        its own velocity at each step (``ddm.models.flow.converted``), so experts of either kind mix.
    time_sampling: "logit_normal" puts more training steps at intermediate t, which SD3 found
        better for images; "uniform" is the textbook choice (and DDPM's).
    """

    path: str = "linear"
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    prediction: str = "velocity"

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path {self.path!r} is unknown; choose one of {sorted(PATHS)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction {self.prediction!r} is unknown; choose one of {list(PREDICTIONS)}")
        if (self.path == "vp") != (self.prediction == "epsilon"):
            raise ValueError(
                f"path={self.path!r} with prediction={self.prediction!r}: a DDPM expert is path vp with prediction "
                "epsilon; flow matching is path linear or cosine with prediction velocity"
            )
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling {self.time_sampling!r} is unknown; choose one of {list(TIME_SAMPLINGS)}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def dit_size(arch: str) -> DiTSize | MMDiTSize:
    """The size of a DiT or MMDiT preset."""
    return DIT_SIZES[arch] if arch in DIT_SIZES else MMDIT_SIZES[arch]


def dit_forward_flops(size: DiTSize, input_size: int, in_channels: int) -> float:
    """Forward FLOPs of one sample (2 per multiply-add): per block and token 24 D^2 for the
    qkv/proj/MLP matmuls plus 4 T D for attention; DiT-B/2 at 32x32 latents is 46 GFLOPs
    (the DiT paper's 23 GMACs). adaLN projections are per sample and left out (< 1%)."""
    tokens = (input_size // size.patch_size) ** 2
    d = size.hidden_size
    blocks = size.depth * (24 * d**2 * tokens + 4 * tokens**2 * d)
    embed = 2 * 2 * tokens * size.patch_size**2 * in_channels * d  # patch embedding + final linear
    return float(blocks + embed)


def forward_flops(cfg: ModelConfig, router: bool = False, num_partitions: int = 2) -> float:
    """Forward FLOPs of one sample (2 per multiply-add) of the model ``cfg`` describes (or its router
    with ``num_partitions`` outputs): every matrix product of the network, counted from its layout.

    DiT, with T patch tokens (T + 1 for the router's CLS token), width D, feed-forward width H:
    the patch embedding (T p^2 C D MACs), the timestep MLP (256 D + D^2), per block the adaLN
    projection (6 D^2), qkv and output projections (4 T D^2), attention (2 T^2 D) and the
    feed-forward (2 T D H; MoE blocks: top_k times that, plus the gate's T D E), then the output
    layer's adaLN (2 D^2) and linear map (T D p^2 C; the router's head: D K on its CLS token).
    Label embeddings are look-ups; norms and activations are not matrix products. MLP: 2 x the
    weights of its linear layers. Tested equal to torch's FLOP counter.
    """
    if cfg.arch in MLP_SIZES:
        return 2.0 * _mlp_linear_weights(MLP_SIZES[cfg.arch], cfg.data_shape[0], num_partitions if router else None)
    c, h, _ = cfg.data_shape
    if cfg.arch in MMDIT_SIZES:
        return mmdit_forward_flops(
            MMDIT_SIZES[cfg.arch], h, c, cfg.text, cfg.mlp_ratio, num_partitions if router else None
        )
    size = DIT_SIZES[cfg.arch]
    if cfg.text.enabled:
        moe = None if router else cfg.moe
        return text_dit_forward_flops(size, h, c, cfg.text, cfg.mlp_ratio, moe, num_partitions if router else None)
    patch_in = size.patch_size**2 * c
    patches = (h // size.patch_size) ** 2
    tokens = patches + (1 if router else 0)
    d, hidden = size.hidden_size, int(size.hidden_size * cfg.mlp_ratio)
    macs = patches * patch_in * d + 256 * d + d * d  # patch embedding, timestep MLP
    for i in range(size.depth):
        moe_block = cfg.moe.enabled and not router and (size.depth - 1 - i) % cfg.moe.every == 0
        ffn = tokens * d * hidden * 2 * (cfg.moe.top_k if moe_block else 1)
        gate = tokens * d * cfg.moe.num_experts if moe_block else 0
        macs += 6 * d * d + 4 * tokens * d * d + 2 * tokens**2 * d + ffn + gate
    out = d * num_partitions if router else patches * d * patch_in * (2 if cfg.learn_sigma else 1)
    macs += 2 * d * d + out
    return 2.0 * macs


def _mlp_linear_weights(size: MLPSize, dim: int, num_partitions: int | None) -> int:
    """Weights of the Linear layers of ``ddm.models.mlp``'s velocity model (or router), counted
    from its layout: input projection, the 2-layer time MLP (64 frequencies), per block a FiLM
    projection and a 2-layer MLP, and the output layer (velocity) or head (router)."""
    h = size.hidden_size
    out = num_partitions if num_partitions is not None else dim
    return dim * h + (64 * h + h * h) + size.depth * (2 * h * h + 2 * h * h) + h * out


def architecture(cfg: ModelConfig, num_partitions: int | None = None) -> dict:
    """Everything needed to rebuild the network without ddm's preset table: explicit sizes, the
    embeddings and what the output means (an export's ``config.json`` carries it; see
    ``examples/plain_dit.py``). ``num_partitions``: the network is a router with that many outputs."""
    common = {
        "num_classes": cfg.num_classes,
        "null_label": cfg.num_classes if cfg.num_classes else None,  # the label index meaning "no class"
        "class_dropout_prob": cfg.class_dropout_prob,
        "time_embedding": {
            "input": "t in [0, 1], scaled by time_scale",
            "time_scale": TIME_SCALE,
            "frequencies": 256,
            "max_period": 10000.0,
            "freq_shift": cfg.time_freq_shift,  # frequencies max_period^(-i / (frequencies/2 - freq_shift))
            "layout": "[cos, sin] then Linear-SiLU-Linear",
        },
        "output": "logits over partitions (N, K)" if num_partitions else "velocity, same shape as x",
        "out_channels": None if num_partitions else cfg.data_shape[0] * (2 if cfg.learn_sigma else 1),
    }
    if num_partitions:
        common["num_partitions"] = num_partitions
    if cfg.arch in MLP_SIZES:
        size = MLP_SIZES[cfg.arch]
        return {"family": "mlp-router" if num_partitions else "mlp", "preset": cfg.arch, "dim": cfg.data_shape[0],
                "hidden_size": size.hidden_size, "depth": size.depth, **common}  # fmt: skip
    size = dit_size(cfg.arch)
    moe = cfg.moe
    if cfg.text.enabled:
        common["text"] = {
            "encoder": cfg.text.encoder,  # rebuild: TextEncoder.load (store:<folder>: store=the export's store)
            "dim": cfg.text.dim,
            "length": cfg.text.length,
            "padding": "every caption padded to length; padding masked out of the cross-attention",
            "pooled": cfg.text.pooled,
            "null_caption": "the learned null_tokens (length x dim, all attended) and null_pooled",
            "caption_dropout_prob": cfg.text.caption_dropout_prob,
        }
    mmdit = cfg.arch in MMDIT_SIZES
    if mmdit:
        common["blocks"] = {
            "double": size.double,  # per-stream weights, joint attention over [caption; image]
            "single": size.single,  # FLUX's single-stream blocks over [caption; image], after the double ones
            "modulation": "AdaLN-Single: a shared t_block, per-stream learned offsets (table_x, table_c; table)",
        }
    return {
        "family": ("text-" if cfg.text.enabled else "")
        + ("mmdit" if mmdit else "dit")
        + ("-router" if num_partitions else ""),
        "preset": cfg.arch,
        "in_channels": cfg.data_shape[0],
        "input_size": cfg.data_shape[1],
        "depth": size.depth,
        "hidden_size": size.hidden_size,
        "num_heads": size.num_heads,
        "patch_size": size.patch_size,
        "mlp_ratio": cfg.mlp_ratio,
        "mlp_activation": "gelu-tanh",
        "norm": "LayerNorm without affine, eps 1e-6, modulated by adaLN-Zero (shift, scale, gate)",
        "pos_embed": "fixed 2-D sin-cos (MAE), added to the patch tokens",
        "attention": "softmax(q k^T / sqrt(head_dim)) v, no mask",
        "moe_blocks": [i for i in range(size.depth) if moe.enabled and (size.depth - 1 - i) % moe.every == 0],
        "moe": {"num_experts": moe.num_experts, "top_k": moe.top_k} if moe.enabled else None,
        **common,
    }


def flow_description(flow: FlowConfig) -> dict:
    """The probability path and the regression target, spelled out (an export's ``config.json``)."""
    paths = {
        "linear": {"alpha": "1 - t", "sigma": "t"},
        "cosine": {"alpha": "cos(pi t / 2)", "sigma": "sin(pi t / 2)"},
        "vp": {"alpha": "sqrt(alpha_bar(t))", "sigma": "sqrt(1 - alpha_bar(t))", "alpha_bar": "exp(-0.1 t - 9.95 t^2)"},
    }
    targets = {
        "velocity": "velocity d/dt x_t = alpha'(t) x_0 + sigma'(t) eps",
        "epsilon": "the noise eps (DDPM's epsilon-prediction); velocity = alpha' x0_hat + sigma' eps_hat",
    }
    return {
        "path": flow.path,
        "convention": "x_t = alpha(t) x_0 + sigma(t) eps, eps ~ N(0, I); t = 0 is data, t = 1 is noise",
        **paths[flow.path],
        "target": targets[flow.prediction],
        "sampling": "integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data)",
    }
