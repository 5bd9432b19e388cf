"""Guided MoE filter (paper section 3.4; authors' ``NonlinearMixtureRes`` in ``moe1.py``).

Shape letters: B batch, D token dim, K retrieved neighbours per token, H x W token grid,
E1 / E2 experts in stage 1 / stage 2.

Stage 1 (guidance fusion, sparse): a conv router on G0 = cat(query tokens, top-1 semantic
prototype) gives per-image probabilities p1 [B, E1]; a hard top-k mask with a straight-through
gradient, ``m = h + p1 - stopgrad(p1)``, zeroes the INPUT of the experts not selected, and the
fused guidance is ``sum_i p1_i * E_i(G0 * m_i)`` over all E1 experts with the soft
probabilities. This is the authors' code; the paper instead writes ``p~_i = p_i`` for the top-k and
0 otherwise. With the code's combination an unselected expert still adds ``p1_i * E_i(0)`` (its
zero input concatenated with BatchNorm-shifted features); kept for fidelity.

Stage 2 (denoising, dense): each of E2 experts filters the cost volume under the fused
guidance (see ``DenoisingExpert``); a conv router on cat(fused guidance, C) gives p2 [B, E2],
smoothed as ``(p2 + 0.01) / sum``, and ``M = sum_i p2_i * sigmoid(logit_i)`` lies in [0, 1].
With ``dense_router=False`` (the authors' first 30 epochs) M is the plain mean of the experts and
router 2 is not run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raid_fast import _checks
from raid_fast.detect.filter.experts import ConvRouter, DenoisingExpert, GuidanceExpert
from raid_fast.detect.filter.losses import DENSE_SMOOTHING, dense_balance_loss, router_entropy, sparse_balance_loss


class GuidedMoEFilter(nn.Module):
    """Two-stage guided Mixture-of-Experts filter: cost volume + guidance -> anomaly map.

    With ``dim=384, k=150`` and the default 3 + 3 experts this is the authors' model: 13,952,799
    trainable parameters (3 x 2,655,360 guidance experts, 3 x 1,962,451 denoising experts,
    36,867 router 1, 62,499 router 2).

    Routing is per image. Both routers start at zero (uniform probabilities). In eval mode routing
    is deterministic: no noise is ever added. The authors add ``0.01 * U[0, 1)`` to the router
    logits in training (and ``0.05 * U[0, 1)`` at eval, which is dropped here on purpose:
    evaluation must be deterministic); set ``router_noise=0.01`` to reproduce their training, and pass a
    ``torch.Generator`` to ``forward`` for reproducible noise. Ties among equal probabilities (the
    zero-initialised router without noise) resolve as ``torch.topk`` does.

    Args:
        dim: token dimension D (the guidance has 2D channels).
        k: cost-volume depth K.
        n_guidance_experts: E1, stage-1 experts.
        guidance_top_k: experts the sparse router activates per image (2 in the code).
        n_denoise_experts: E2, stage-2 experts.
        router_patch: kernel and stride of both conv routers (4 in the code).
        gate_scale: strength of the conv gate on V in the denoising experts (0.1 in the code).
        router_noise: scale of the uniform noise added to router logits in train mode only
            (default 0: off; the authors use 0.01).

    Example:
        >>> moe = GuidedMoEFilter(dim=32, k=16).eval()
        >>> m, aux = moe(torch.randn(2, 64, 18, 18), torch.rand(2, 16, 18, 18))
        >>> m.shape, aux["probs1"].shape
        (torch.Size([2, 18, 18]), torch.Size([2, 3]))
    """

    def __init__(
        self,
        dim: int = 384,
        k: int = 150,
        n_guidance_experts: int = 3,
        guidance_top_k: int = 2,
        n_denoise_experts: int = 3,
        router_patch: int = 4,
        gate_scale: float = 0.1,
        router_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = _checks.check_int("dim", dim, minimum=1)
        self.k = _checks.check_int("k", k, minimum=1)
        self.n_guidance_experts = _checks.check_int("n_guidance_experts", n_guidance_experts, minimum=1)
        self.guidance_top_k = _checks.check_int(
            "guidance_top_k", guidance_top_k, minimum=1, maximum=self.n_guidance_experts
        )
        self.n_denoise_experts = _checks.check_int("n_denoise_experts", n_denoise_experts, minimum=1)
        router_patch = _checks.check_int("router_patch", router_patch, minimum=1)
        if router_noise < 0:
            msg = f"router_noise must be >= 0, got {router_noise}"
            raise ValueError(msg)
        self.router_noise = float(router_noise)

        guide_in = 2 * dim
        guide_out = 3 * dim
        self.router1 = ConvRouter(guide_in, n_guidance_experts, patch=router_patch)
        self.guidance_experts = nn.ModuleList(GuidanceExpert(guide_in, dim) for _ in range(n_guidance_experts))
        self.router2 = ConvRouter(guide_out + k, n_denoise_experts, patch=router_patch)
        self.denoise_experts = nn.ModuleList(
            DenoisingExpert(guide_out, k, gate_scale=gate_scale) for _ in range(n_denoise_experts)
        )

    def _route(self, router: ConvRouter, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        logits = router(x)  # [B, E]
        if self.training and self.router_noise > 0:
            noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            logits = logits + self.router_noise * noise
        return F.softmax(logits, dim=1)  # [B, E]

    def _check_inputs(self, guidance: torch.Tensor, cost: torch.Tensor) -> None:
        _checks.check_ndim("guidance", guidance, (4,), f"[B, 2D={2 * self.dim}, H, W]")
        _checks.check_ndim("cost", cost, (4,), f"[B, K={self.k}, H, W]")
        _checks.check_floating("guidance", guidance)
        _checks.check_floating("cost", cost)
        _checks.check_same_device(guidance=guidance, cost=cost)
        if guidance.shape[1] != 2 * self.dim:
            msg = (
                f"guidance must have 2D = {2 * self.dim} channels (query tokens and prototype, D={self.dim}), "
                f"got {guidance.shape[1]} in shape {tuple(guidance.shape)}"
            )
            raise ValueError(msg)
        if cost.shape[1] != self.k:
            msg = f"cost must have K = {self.k} channels, got {cost.shape[1]} in shape {tuple(cost.shape)}"
            raise ValueError(msg)
        b, _, h, w = guidance.shape
        if (cost.shape[0], cost.shape[2], cost.shape[3]) != (b, h, w):
            msg = (
                f"cost must match guidance in B, H, W = {(b, h, w)}, "
                f"got {(cost.shape[0], cost.shape[2], cost.shape[3])} (cost shape {tuple(cost.shape)})"
            )
            raise ValueError(msg)
        if b == 0 or h == 0 or w == 0:
            msg = f"guidance and cost must have B, H, W >= 1, got {(b, h, w)}"
            raise ValueError(msg)

    def forward(
        self,
        guidance: torch.Tensor,
        cost: torch.Tensor,
        dense_router: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Filters the cost volume into an anomaly map.

        Args:
            guidance: G0 = cat(query tokens, top-1 semantic prototype) ``[B, 2D, H, W]``.
            cost: cost volume C, ``1 - cos`` sorted ascending along K, ``[B, K, H, W]``.
            dense_router: True (default) weights the denoising experts by router 2; False is the
                authors' warm-up (epochs < 30): plain mean of the experts, router 2 not run,
                ``l2 = 0``, ``probs2`` uniform.
            generator: source of the train-mode router noise (only used when ``router_noise > 0``),
                on the device of the inputs.

        Returns:
            ``(M, aux)``: M ``[B, H, W]`` in [0, 1], and aux with ``probs1`` ``[B, E1]`` (router-1
            softmax), ``gate1`` ``[B, E1]`` (top-k mask, exactly ``guidance_top_k`` ones per row,
            straight-through gradient), ``probs2`` ``[B, E2]`` (smoothed router-2 weights) and
            the scalar balance terms ``l1``, ``entropy1``, ``l2``.

        Raises:
            ValueError: wrong ndim, channel counts other than (2D, K), or B/H/W that differ.
            TypeError: non-floating inputs.
        """
        self._check_inputs(guidance, cost)
        b = guidance.shape[0]

        p1 = self._route(self.router1, guidance, generator)  # [B, E1]
        top = p1.topk(self.guidance_top_k, dim=1).indices  # [B, top_k]
        hard = torch.zeros_like(p1).scatter_(1, top, 1.0)  # [B, E1]
        gate1 = hard + p1 - p1.detach()  # [B, E1], value = hard, gradient = d p1
        fused = None
        for i, expert in enumerate(self.guidance_experts):
            out = p1[:, i, None, None, None] * expert(guidance * gate1[:, i, None, None, None])  # [B, 3D, H, W]
            fused = out if fused is None else fused + out

        maps = torch.stack([expert(fused, cost) for expert in self.denoise_experts], dim=1)  # [B, E2, H, W]
        if dense_router:
            p2 = self._route(self.router2, torch.cat([fused, cost], dim=1), generator)  # [B, E2]
            p2 = (p2 + DENSE_SMOOTHING) / (p2 + DENSE_SMOOTHING).sum(dim=1, keepdim=True)
            l2 = dense_balance_loss(p2)
        else:
            p2 = maps.new_full((b, self.n_denoise_experts), 1.0 / self.n_denoise_experts)  # [B, E2]
            l2 = maps.new_zeros(())
        m = (p2[:, :, None, None] * maps).sum(dim=1)  # [B, H, W]

        aux = {
            "probs1": p1,
            "gate1": gate1,
            "probs2": p2,
            "l1": sparse_balance_loss(p1, gate1),
            "entropy1": router_entropy(p1),
            "l2": l2,
        }
        return m, aux
