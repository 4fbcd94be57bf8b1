"""Flow matching: the probability path, the velocity loss, time sampling and ODE samplers.

One ``FlowMatching`` object is the whole objective. Expert training calls ``training_losses``,
router training calls ``noised`` for its (x_t, t) pairs, and sampling calls ``sample`` with any
velocity function (one model, a guided model, or an ensemble). Swapping the path changes all
three consistently, as SiT swapped DiT's diffusion for flow matching behind one interface.

Convention: t = 0 is data and t = 1 is noise, x_t = alpha(t) x_0 + sigma(t) eps, and the
regression target is the path's velocity d/dt x_t = alpha'(t) x_0 + sigma'(t) eps.
Sampling integrates dx/dt = v(x, t) from t = 1 down to t = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ddm.models.config import SAMPLERS, FlowConfig
from ddm.models.layers import is_shared
from ddm.models.text_encoder import TextEmbedding

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""v(x, t): x of shape (N, ...) and t of shape (N,) -> velocity of x's shape."""


class Path(Protocol):
    def alpha(self, t: torch.Tensor) -> torch.Tensor: ...
    def sigma(self, t: torch.Tensor) -> torch.Tensor: ...
    def d_alpha(self, t: torch.Tensor) -> torch.Tensor: ...
    def d_sigma(self, t: torch.Tensor) -> torch.Tensor: ...


class LinearPath:
    """Rectified flow / conditional OT: x_t = (1 - t) x_0 + t eps, target eps - x_0."""

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def time_at_snr(self, r):
        """The t where alpha / sigma = r (r >= 0; inf at t = 0)."""
        return 1 / (1 + r)


class CosinePath:
    """Variance-preserving trigonometric path: x_t = cos(pi t / 2) x_0 + sin(pi t / 2) eps."""

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def time_at_snr(self, r):
        return (2 / math.pi) * torch.atan2(torch.ones_like(r), r)


class VPPath:
    """DDPM's variance-preserving path in continuous time: the DiT paper's linear betas (1e-4 to
    0.02 over 1000 steps) are beta(t) = 0.1 + 19.9 t, so alpha_bar(t) = exp(-B(t)) with
    B(t) = 0.1 t + 9.95 t^2; alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar). At t = 1
    alpha_bar = 4.3e-5 (DDPM's last step): the path never reaches pure noise."""

    B0, B1 = 0.1, 20.0

    def _b(self, t):
        return self.B0 * t + 0.5 * (self.B1 - self.B0) * t**2

    def alpha(self, t):
        return torch.exp(-0.5 * self._b(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self._b(t)))

    def d_alpha(self, t):
        return -0.5 * (self.B0 + (self.B1 - self.B0) * t) * self.alpha(t)

    def d_sigma(self, t):
        return 0.5 * (self.B0 + (self.B1 - self.B0) * t) * torch.exp(-self._b(t)) / self.sigma(t)

    def step_kl_bits(self, v, eps_hat, x0, x_t, t) -> torch.Tensor:
        """Per sample, the KL in bits per dimension between DDPM's true reverse step from t to
        t - 1/1000 (its posterior q(x_s | x_t, x_0)) and the model's: mean from ``eps_hat`` (the
        caller detaches it, as improved DDPM does), variance exp(f log beta + (1 - f) log beta~)
        with f = (v + 1) / 2, beta = 1 - alpha_bar(t) / alpha_bar(s), beta~ = beta (1 - alpha_bar(s))
        / (1 - alpha_bar(t)). The first step (t < 1.5/1000), whose posterior variance is 0, counts 0."""
        x0, x_t, v, eps_hat = (a.double() for a in (x0, x_t, v, eps_hat))
        first = t < 1.5 * DDPM_STEP
        t = torch.where(first, 2 * DDPM_STEP, t.double())  # finite everywhere; the first step is masked below
        s = t - DDPM_STEP
        b_t, b_s = self._b(t), self._b(s)
        beta = -torch.expm1(b_s - b_t)  # 1 - alpha_bar(t) / alpha_bar(s)
        one_minus_t, one_minus_s = -torch.expm1(-b_t), -torch.expm1(-b_s)
        beta_post = beta * one_minus_s / one_minus_t
        ab_t, ab_s = torch.exp(-b_t), torch.exp(-b_s)

        def mean(x0_):  # the posterior's mean, from x_0 (true or predicted)
            c0 = ab_s.sqrt() * beta / one_minus_t
            ct = (1 - beta).sqrt() * one_minus_s / one_minus_t
            return _bcast(c0, x_t) * x0_ + _bcast(ct, x_t) * x_t

        x0_hat = (x_t - _bcast(one_minus_t.sqrt(), x_t) * eps_hat) / _bcast(ab_t.sqrt(), x_t)
        log_post, log_beta = _bcast(beta_post.log(), x_t), _bcast(beta.log(), x_t)
        frac = (v + 1) / 2
        log_var = frac * log_beta + (1 - frac) * log_post
        kl = 0.5 * (-1 + log_var - log_post + torch.exp(log_post - log_var) + (mean(x0) - mean(x0_hat)) ** 2
                    * torch.exp(-log_var))  # fmt: skip
        return torch.where(first, 0.0, kl.flatten(1).mean(1) / math.log(2.0))

    def time_at_snr(self, r):
        """The t where alpha / sigma = r; beyond t = 1 (r below DDPM's last step) it is 1."""
        b = torch.log1p(r.pow(-2))  # -log alpha_bar, alpha_bar = r^2 / (1 + r^2)
        k = self.B1 - self.B0
        return ((torch.sqrt(self.B0**2 + 2 * k * b) - self.B0) / k).clamp(max=1.0)


PATH_CLASSES: dict[str, type] = {"linear": LinearPath, "cosine": CosinePath, "vp": VPPath}
DDPM_STEP = 1e-3  # one of DDPM's 1000 steps, in the continuous time of VPPath


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1) to broadcast against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


@dataclass(frozen=True)
class FlowMatching(FlowConfig):
    """The flow-matching objective and its samplers, for the path and time sampling of its
    ``FlowConfig`` fields (``FlowMatching(**to_dict(flow_config))`` or ``FlowMatching.of``)."""

    @classmethod
    def of(cls, cfg: FlowConfig) -> "FlowMatching":
        if isinstance(cfg, cls):
            return cfg
        return cls(cfg.path, cfg.time_sampling, cfg.logit_mean, cfg.logit_std, cfg.prediction)

    @property
    def _path(self) -> Path:
        return PATH_CLASSES[self.path]()

    # --- the path -------------------------------------------------------------------------
    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x_0 + sigma(t) eps."""
        p = self._path
        return _bcast(p.alpha(t), x0) * x0 + _bcast(p.sigma(t), x0) * noise

    def target_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d/dt x_t = alpha'(t) x_0 + sigma'(t) eps, the conditional velocity the model regresses."""
        p = self._path
        return _bcast(p.d_alpha(t), x0) * x0 + _bcast(p.d_sigma(t), x0) * noise

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha, sigma, alpha', sigma') at t; closed-form analyses need them."""
        p = self._path
        return p.alpha(t), p.sigma(t), p.d_alpha(t), p.d_sigma(t)

    # --- training ---------------------------------------------------------------------------
    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training times in [0, 1] from the configured distribution."""
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        z = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t) for data x0 at random times: the router's training inputs."""
        t = self.sample_time(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.interpolate(x0, noise, t), t

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        y: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss |f(x_t, t, y) - target|^2, averaged over data dimensions; the target is
        the velocity d/dt x_t, or the noise eps for ``prediction="epsilon"`` (DDPM's loss).

        A model with a learned sigma (``model.learn_sigma``, DDPM experts only) adds improved
        DDPM's variational bound of the reverse step in bits per dimension (``VPPath.step_kl_bits``,
        the mean detached so only the variance learns from it), as DiT trains: loss = MSE + bound.

        Returns {"loss": (N,)}, plus "moe_aux" (a scalar) when the model has MoE layers and "vb"
        (N,) with a learned sigma.
        """
        if t is None:
            t = self.sample_time(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.interpolate(x0, noise, t)
        target = noise if self.prediction == "epsilon" else self.target_velocity(x0, noise, t)
        sigma = getattr(model, "learn_sigma", False)
        if sigma and (self.path, self.prediction) != ("vp", "epsilon"):
            raise ValueError("a learned sigma is a DDPM expert's: flow.path=vp, flow.prediction=epsilon")
        pred, v = model(x_t, t, y, with_sigma=True) if sigma else (model(x_t, t, y), None)
        if pred.shape != x0.shape:
            raise ValueError(f"model returned shape {tuple(pred.shape)} for data of shape {tuple(x0.shape)}")
        out = {"loss": (pred.float() - target.float()).pow(2).flatten(1).mean(1)}
        if sigma:
            out["vb"] = self._path.step_kl_bits(v, pred.detach(), x0, x_t, t).to(out["loss"].dtype)
            out["loss"] = out["loss"] + out["vb"]
        aux = getattr(model, "moe_aux_loss", None)
        if isinstance(aux, torch.Tensor) and aux.requires_grad:
            out["moe_aux"] = aux
        return out

    # --- sampling ---------------------------------------------------------------------------
    def sample(
        self,
        velocity: VelocityFn,
        noise: torch.Tensor,
        num_steps: int = 50,
        method: str = "euler",
        t_start: float = 1.0,
        t_end: float = 0.0,
    ) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from t_start (noise) to t_end (data) on a uniform grid.

        Euler costs one velocity evaluation per step and has global error O(1/steps);
        Heun (trapezoidal predictor-corrector) costs two and has error O(1/steps^2).
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if method not in SAMPLERS:
            raise ValueError(f"sampler {method!r} is unknown; choose one of {list(SAMPLERS)}")
        ts = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64).tolist()
        x = noise
        n = x.shape[0]
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t_cur
            v = velocity(x, torch.full((1,), t_cur, device=x.device, dtype=x.dtype).expand(n))
            if method == "euler":
                x = x + dt * v
            else:
                x_pred = x + dt * v
                v_next = velocity(x_pred, torch.full((1,), t_next, device=x.device, dtype=x.dtype).expand(n))
                x = x + 0.5 * dt * (v + v_next)
        return x


def converted(
    model: Callable[..., torch.Tensor], own: FlowMatching, target: FlowMatching
) -> Callable[..., torch.Tensor]:
    """``model`` (trained on ``own``'s path to predict ``own.prediction``) as a velocity on
    ``target``'s path: f(x, t, y) -> v_target(x, t, y), exact for exact predictors.

    At the ensemble's (x_t, t) the expert is asked at its own time t' of equal signal-to-noise
    ratio alpha / sigma, on the rescaled state c x_t (c = (alpha' + sigma') / (alpha + sigma), the
    primed coefficients the expert's at t'): the same x_0 and eps, so its prediction gives the
    posterior means E[x_0 | x_t] and E[eps | x_t], and v = alpha'(t) E[x_0] + sigma'(t) E[eps] on
    the target path. A velocity expert's (x_0, eps) come from its own path's 2 x 2 system. Where
    the target's SNR is beyond the expert's range (a DDPM expert never saw t = 1's pure noise),
    t' stops at its end and eps is taken from x_t = alpha x_0 + sigma eps, so the velocity stays
    consistent with the state. Same path and both velocity: ``model`` itself."""
    if own.path == target.path and own.prediction == target.prediction:
        return model
    if target.prediction != "velocity":
        raise ValueError("an ensemble samples with velocities: its flow must have prediction velocity")
    po, pt = own._path, target._path

    def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        shared = is_shared(t)  # keep one shared time shared
        t64 = (t[:1] if shared else t).to(torch.float64)
        a, s, da, ds = pt.alpha(t64), pt.sigma(t64), pt.d_alpha(t64), pt.d_sigma(t64)
        t_own = po.time_at_snr(a / s).clamp(0.0, 1.0)  # s = 0 (t = 0): r = inf -> t' = 0
        t_own = t_own.to(t.dtype).to(torch.float64)  # the time the model is given, in its dtype
        ak, sk, dak, dsk = po.alpha(t_own), po.sigma(t_own), po.d_alpha(t_own), po.d_sigma(t_own)
        c = (ak + sk) / (a + s)
        if shared:
            a, s, da, ds, ak, sk, dak, dsk, c = (v.expand(len(t)) for v in (a, s, da, ds, ak, sk, dak, dsk, c))
            t_in = t_own.to(t.dtype).expand(len(t))
        else:
            t_in = t_own.to(t.dtype)
        x64 = x.to(torch.float64)
        x_own = _bcast(c, x64) * x64
        out = model(x_own.to(x.dtype), t_in, y).to(torch.float64)
        if own.prediction == "epsilon":
            eps = out
            x0 = (x_own - _bcast(sk, x64) * eps) / _bcast(ak, x64)
        else:
            det = ak * dsk - sk * dak  # > 0 on every path here
            x0 = (_bcast(dsk, x64) * x_own - _bcast(sk, x64) * out) / _bcast(det, x64)
            eps = (_bcast(ak, x64) * out - _bcast(dak, x64) * x_own) / _bcast(det, x64)
        on = (s > 0).reshape(-1, *([1] * (x.ndim - 1)))
        eps = torch.where(on, (x64 - _bcast(a, x64) * x0) / _bcast(s.clamp(min=1e-300), x64), eps)
        return (_bcast(da, x64) * x0 + _bcast(ds, x64) * eps).to(x.dtype)

    return velocity


def unguided(scale: float | torch.Tensor) -> bool:
    """Whether ``scale`` (a number, or one per sample) asks for no guidance: one branch suffices."""
    return bool((scale == 1.0).all()) if isinstance(scale, torch.Tensor) else scale == 1.0


def guided(
    model: Callable[..., torch.Tensor],
    y,
    scale: float | torch.Tensor = 1.0,
    null_label: int | None = None,
) -> VelocityFn:
    """A velocity function v(x, t) for labels or captions y, with classifier-free guidance.

    v = v(x, t, null) + scale * (v(x, t, y) - v(x, t, null)), the null being the null label or, for
    captions (a ``TextEmbedding``), the model's null caption. ``scale`` is one number or one per
    sample (N,) (guidance per prompt). A scale of 1 everywhere is the plain conditional model (one
    forward); otherwise the conditional and unconditional branches run as one batch.
    """
    if y is None:
        if not unguided(scale):
            raise ValueError(f"classifier-free guidance (scale={scale}) needs class labels or captions y; got y=None")
        return lambda x, t: model(x, t, None)
    if unguided(scale):
        return lambda x, t: model(x, t, y)
    if isinstance(y, TextEmbedding):
        null = model.null_text(len(y))
        both = TextEmbedding.cat(
            [y, TextEmbedding(null.tokens.to(y.tokens.dtype), null.mask, null.pooled.to(y.pooled.dtype))]
        )
    else:
        both = torch.cat([y, torch.full_like(y, model.null_label if null_label is None else null_label)])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t[:1].expand(2 * len(t)) if is_shared(t) else torch.cat([t, t])
        out = model(torch.cat([x, x]), tt, both)
        wide = torch.promote_types(out.dtype, torch.float32)  # the extrapolation in fp32 at least (bf16 models)
        v_cond, v_uncond = out.to(wide).chunk(2)
        s = scale.to(wide).reshape(-1, *[1] * (out.ndim - 1)) if isinstance(scale, torch.Tensor) else scale
        return (v_uncond + s * (v_cond - v_uncond)).to(out.dtype)

    return velocity
