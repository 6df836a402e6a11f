"""Image embeddings for partitioning and routing, and the router's pure weight functions.

The partition stage and the ensemble's router must embed images the same way, so both call
``embed_images``: the frozen vision tower's last hidden states, mean-pooled over patches,
L2-normalised (spherical k-means lives on the unit sphere).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["embed_images", "cosine_scores", "route_weights"]


@torch.no_grad()
def embed_images(vision_tower: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) → (B, D) unit vectors."""
    hidden = vision_tower(pixel_values=pixel_values).last_hidden_state  # (B, P, D)
    return torch.nn.functional.normalize(hidden.float().mean(dim=1), dim=-1)


def cosine_scores(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, D), (K, D) → (B, K) cosine similarities."""
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    c = torch.nn.functional.normalize(centroids.float(), dim=-1)
    return e @ c.T


def route_weights(embeddings: torch.Tensor, centroids: torch.Tensor, mode: str = "top1",
                  temperature: float = 0.1) -> torch.Tensor:
    """(B, K) mixture weights: ``top1`` = one-hot of the nearest centroid (ties → lowest k),
    ``soft`` = softmax(cos / temperature)."""
    scores = cosine_scores(embeddings, centroids)
    if mode == "top1":
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).float()
    if mode == "soft":
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        return torch.softmax(scores / temperature, dim=-1)
    raise ValueError(f"router mode must be 'top1' or 'soft', got {mode!r}")
