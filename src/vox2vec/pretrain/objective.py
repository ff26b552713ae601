"""Voxel embeddings from the pyramid, the projection head and the symmetric InfoNCE loss (τ = 0.1)."""

from __future__ import annotations

import torch
from torch import nn

from vox2vec.modeling import FPN3d, ProjectionHead


def gather_voxels(pyramid: list[torch.Tensor], voxels: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated level features at each patch's voxels: patch j's (m_j, 3) indices → (Σ m_j, Σ C_i)."""
    rows = []
    for j, index in enumerate(voxels):
        index = index.to(pyramid[0].device).long()
        rows.append(torch.cat([level[j, :, (index[:, 0] >> i), (index[:, 1] >> i), (index[:, 2] >> i)].T
                               for i, level in enumerate(pyramid)], dim=1))
    return torch.cat(rows)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE: row k of z1 and z2 are positives; all 2N − 2 other rows of both views are negatives."""
    z1, z2 = z1.float(), z2.float()
    s11, s12, s22 = z1 @ z1.T / temperature, z1 @ z2.T / temperature, z2 @ z2.T / temperature
    eye = torch.eye(len(z1), dtype=torch.bool, device=z1.device)
    s11 = s11.masked_fill(eye, float("-inf"))
    s22 = s22.masked_fill(eye, float("-inf"))
    positives = s12.diagonal()
    loss_1 = torch.logsumexp(torch.cat([s11, s12], dim=1), dim=1) - positives
    loss_2 = torch.logsumexp(torch.cat([s12.T, s22], dim=1), dim=1) - positives
    return (loss_1.mean() + loss_2.mean()) / 2


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
