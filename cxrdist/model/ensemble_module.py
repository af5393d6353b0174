"""The fold ensemble as one module: preprocessed images -> per-label probabilities.

The same arithmetic as `cxrdist evaluate` / `predict`: every fold model's refined logits z' through
a sigmoid, averaged over the views (the image, and its mirror image with flip TTA), then averaged
over the models. It is what `cxrdist export` traces.
"""

from __future__ import annotations

import torch
from torch import nn


class EnsembleProbabilities(nn.Module):
    def __init__(self, models: list[nn.Module], tta: bool) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.tta = tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        per_model = []
        for model in self.models:
            views = [torch.sigmoid(model(images).float())]
            if self.tta:
                views.append(torch.sigmoid(model(torch.flip(images, dims=[-1])).float()))
            per_model.append(torch.stack(views).mean(dim=0))
        return torch.stack(per_model).mean(dim=0)
