"""Voxel embeddings from the pyramid, the projection head and the symmetric InfoNCE loss (τ = 0.1)."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from vox2vec.errors import InputError
from vox2vec.modeling import FPN3d, ProjectionHead

__all__ = ["ContrastiveModel", "gather_voxels", "info_nce", "info_nce_dense"]


def gather_voxels(pyramid: list[torch.Tensor], voxels: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated level features at each patch's voxels: patch j's (m_j, 3) indices → (Σ m_j, Σ C_i)."""
    rows = []
    for j, index in enumerate(voxels):
        index = index.to(pyramid[0].device, non_blocking=True).long()
        rows.append(torch.cat([level[j, :, (index[:, 0] >> i), (index[:, 1] >> i), (index[:, 2] >> i)].T
                               for i, level in enumerate(pyramid)], dim=1))
    return torch.cat(rows)


def info_nce_dense(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE with the full similarity matrices (the reference form; memory grows as (2N)²)."""
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z1, z2 = z1.to(dtype), z2.to(dtype)
    s11, s12, s22 = z1 @ z1.T / temperature, z1 @ z2.T / temperature, z2 @ z2.T / temperature
    eye = torch.eye(len(z1), dtype=torch.bool, device=z1.device)
    s11 = s11.masked_fill(eye, float("-inf"))
    s22 = s22.masked_fill(eye, float("-inf"))
    positives = s12.diagonal()
    loss_1 = torch.logsumexp(torch.cat([s11, s12], dim=1), dim=1) - positives
    loss_2 = torch.logsumexp(torch.cat([s12.T, s22], dim=1), dim=1) - positives
    return (loss_1.mean() + loss_2.mean()) / 2


class _BlockwiseInfoNCE(torch.autograd.Function):
    """InfoNCE over z = [z1; z2] (2N rows) computed ``block`` rows at a time, forward and backward.

    With S = z zᵀ/τ (diagonal excluded) and p(r) the positive of row r, the loss is
    L = 1/(2N) Σ_r [logsumexp_c S_rc − S_r,p(r)], and dL/dS = (softmax(S) − onehot(p)) / (2N) =: G, so
    dL/dz = (G + Gᵀ) z / τ. Only one (block × 2N) slice of S or G exists at a time; the backward pass recomputes
    the slices from z and the saved per-row logsumexp.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, temperature: float, block: int) -> torch.Tensor:
        rows = len(z)
        half = rows // 2
        partner = (torch.arange(rows, device=z.device) + half) % rows
        lse = torch.empty(rows, dtype=z.dtype, device=z.device)
        total = z.new_zeros(())
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            sim = _masked_similarity(z, start, stop, temperature)
            lse[start:stop] = torch.logsumexp(sim, dim=1)
            positive = sim.gather(1, partner[start:stop, None]).squeeze(1)
            total = total + (lse[start:stop] - positive).sum()
        ctx.save_for_backward(z, lse)
        ctx.temperature, ctx.block = temperature, block
        return total / rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        z, lse = ctx.saved_tensors
        rows, tau = len(z), ctx.temperature
        half = rows // 2
        grad = torch.zeros_like(z)
        scale = grad_output / rows
        for start in range(0, rows, ctx.block):
            stop = min(start + ctx.block, rows)
            sim = _masked_similarity(z, start, stop, tau)
            g = torch.exp(sim - lse[start:stop, None])  # softmax of each row, 0 on the diagonal
            local = torch.arange(stop - start, device=z.device)
            g[local, (local + start + half) % rows] -= 1.0
            g = g * scale
            grad[start:stop] += g @ z / tau
            grad += g.T @ z[start:stop] / tau
        return grad, None, None


def _masked_similarity(z: torch.Tensor, start: int, stop: int, temperature: float) -> torch.Tensor:
    """Rows ``start:stop`` of z zᵀ/τ with each row's own entry set to −∞."""
    sim = z[start:stop] @ z.T / temperature
    local = torch.arange(stop - start, device=z.device)
    sim[local, local + start] = float("-inf")
    return sim


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, block: int = 1024) -> torch.Tensor:
    """Symmetric InfoNCE: row k of z1 and z2 are positives; all 2N − 2 other rows of both views are negatives.

    Computed ``block`` rows at a time (forward and backward), so memory is O(block · 2N) instead of the three
    N × N matrices of :func:`info_nce_dense`, with the same value and gradient.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise InputError(f"info_nce block must be a positive number of rows, got {block!r}")
    if len(z1) != len(z2) or len(z1) < 1:
        raise InputError(f"info_nce needs two equally long, non-empty sets of embeddings, got {len(z1)} and {len(z2)}")
    z = torch.cat([z1, z2])
    return _BlockwiseInfoNCE.apply(z.to(torch.promote_types(z.dtype, torch.float32)), temperature, block)


class ContrastiveModel(nn.Module):
    """Backbone + projection head; each view runs separately (BatchNorm statistics per view, as the original)."""

    def __init__(self, backbone: FPN3d, projection_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.embedding_dim
        self.proj_head = ProjectionHead(dim, dim, projection_dim)

    def forward(self, view_1: torch.Tensor, view_2: torch.Tensor, voxels_1: list[torch.Tensor],
                voxels_2: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z1 = self.proj_head(gather_voxels(self.backbone(view_1), voxels_1).float())
        z2 = self.proj_head(gather_voxels(self.backbone(view_2), voxels_2).float())
        return z1, z2
