"""Losses of the guided MoE filter: binary focal loss and the router balance loss.

Total objective (paper eq. in section 3.5, authors' ``run_train_*.py``)::

    L = focal(M, M_s) + lambda_bal * (L1 + 0.01 * H(p1) + L2),   lambda_bal = 0.005

Shape letters: B batch, E experts in one stage.
"""

from __future__ import annotations

import torch

FOCAL_ALPHA = 0.5
FOCAL_GAMMA = 4.0
ENTROPY_WEIGHT = 0.01
DENSE_SMOOTHING = 0.01
PROB_EPS = 1e-6


def binary_focal_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
    eps: float = PROB_EPS,
) -> torch.Tensor:
    """Binary focal loss on probabilities, mean-reduced.

    ``bce = -(y log p + (1 - y) log(1 - p))``, ``pt = exp(-bce)``,
    ``loss = alpha * (1 - pt) ** gamma * bce``. ``alpha`` is a constant factor, as in the
    authors' ``BinaryFocalLoss(alpha=0.5, gamma=4, logits=False)``.

    ``pred`` is clamped to ``[eps, 1 - eps]`` before the logs, so p = 0 or 1 gives a finite loss
    (at most ``-log(eps)``, about 13.8 per element) and finite gradients; the gradient is zero for
    elements beyond the clamp, which only exactly saturated sigmoids reach.

    Args:
        pred: probabilities in [0, 1], any shape (e.g. ``[B, H, W]``).
        target: targets in [0, 1] (binary masks; soft targets work too), same shape as ``pred``.
        alpha: constant weight.
        gamma: focusing exponent.
        eps: clamp margin for ``pred``.

    Returns:
        Scalar tensor.
    """
    if pred.shape != target.shape:
        msg = f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        raise ValueError(msg)
    p = pred.clamp(eps, 1.0 - eps)
    target = target.to(p.dtype)
    bce = -(target * torch.log(p) + (1.0 - target) * torch.log1p(-p))
    pt = torch.exp(-bce)
    return (alpha * (1.0 - pt).pow(gamma) * bce).mean()


def sparse_balance_loss(probs: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Switch-style balance term of the sparse (stage-1) router: ``L1 = sum_e P_e f_e``.

    ``P_e`` is the batch-mean routing probability and ``f_e`` the batch-mean top-k mask (it counts
    top-k picks, so ``sum_e f_e = top_k``). The authors write it as ``E * mean_e(P_e f_e)``, which is
    this sum (they multiply by the stage-2 expert count, equal to the stage-1 count, 3, in their
    model). Uniform routing gives ``top_k / E``; for a single image that is the minimum, since the
    top-k probabilities of a distribution over E experts sum to at least ``top_k / E``.

    Args:
        probs: router probabilities ``[B, E]``.
        gate: top-k mask (0/1 values, may carry straight-through gradients) ``[B, E]``.

    Returns:
        Scalar tensor.
    """
    return (probs.mean(dim=0) * gate.mean(dim=0)).sum()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Batch-mean entropy ``mean_b H(p_b)`` of router probabilities ``[B, E]`` (natural log).

    The authors ADD ``0.01 * H(p1)`` to the balance loss, so it rewards confident (low-entropy)
    stage-1 routing; kept as in their code.
    """
    return -(probs * torch.log(probs + 1e-8)).sum(dim=1).mean()


def dense_balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Balance term of the dense (stage-2) router: ``L2 = E * sum_e (mean_b p_e)^2``.

    Equals 1, its minimum, when the batch-mean routing is uniform, and E when one expert takes all.

    Args:
        probs: router probabilities ``[B, E]``.

    Returns:
        Scalar tensor.
    """
    n_experts = probs.shape[1]
    return n_experts * probs.mean(dim=0).pow(2).sum()


def balance_loss(aux: dict) -> torch.Tensor:
    """``L_bal = L1 + 0.01 * H(p1) + L2`` from the aux dict of ``GuidedMoEFilter.forward``.

    Args:
        aux: dict with scalar tensors ``"l1"``, ``"entropy1"`` and ``"l2"`` (``l2`` is 0 during the
            router-2 warm-up).

    Returns:
        Scalar tensor (unweighted; the caller applies ``lambda_bal``).
    """
    return aux["l1"] + ENTROPY_WEIGHT * aux["entropy1"] + aux["l2"]


def total_loss(pred: torch.Tensor, target: torch.Tensor, aux: dict, lambda_bal: float = 0.005) -> torch.Tensor:
    """Training objective ``focal(pred, target) + lambda_bal * balance_loss(aux)``.

    Args:
        pred: anomaly probabilities, e.g. M ``[B, H, W]`` or its upsampled ``[B, H_img, W_img]``.
        target: synthetic anomaly mask of the same shape, values in {0, 1}.
        aux: the aux dict returned with ``pred`` by ``GuidedMoEFilter.forward``.
        lambda_bal: balance-loss weight (0.005 in the paper and the code).

    Returns:
        Scalar tensor.
    """
    return binary_focal_loss(pred, target) + lambda_bal * balance_loss(aux)
