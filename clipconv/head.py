"""Text-initialized classification head and the image classifier built on it."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from clipconv.runtime.progress import progress as show_progress

__all__ = ["class_embeddings", "text_head", "ImageClassifier", "zero_shot_logits"]


@torch.no_grad()
def class_embeddings(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: Union[str, torch.device, None] = None,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Prompt-ensemble class embeddings, shape (C, embed_dim), fp32.

    Each template is encoded and L2-normalized, the templates of a class are averaged, and the mean
    is L2-normalized again (CLIP's zero-shot recipe).
    """
    if not templates:
        raise ValueError("at least one template is needed")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template '{template}' must contain exactly one '{{}}' for the class name")
    device = device if device is not None else next(model.parameters()).device
    prompts = [template.format(name) for name in classnames for template in templates]
    encoded = []
    chunks = range(0, len(prompts), batch_size)
    if progress:

        chunks = show_progress(chunks, desc="text encoder", unit="batch")
    for start in chunks:
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        encoded.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(encoded).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def text_head(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: Union[str, torch.device, None] = None,
    embeddings: Optional[torch.Tensor] = None,
) -> nn.Linear:
    """A Linear(embed_dim → C) head whose rows are the class embeddings and whose bias is zero."""
    weight = embeddings if embeddings is not None else class_embeddings(model, tokenizer, classnames, templates, device)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
    return head.to(weight.device)


class ImageClassifier(nn.Module):
    """logits = logit_scale · head(normalize(visual(images))).

    With a text-initialized head and an untouched (or zero-initialized-adapter) encoder the logits equal
    zero-shot CLIP's. `logit_scale` is a fixed number (CLIP's learned temperature, 100 for OpenAI).
    """

    def __init__(self, visual: nn.Module, head: nn.Linear, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.head = head
        self.logit_scale = float(logit_scale)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized fp32 image features."""
        dtype = _module_dtype(self.visual)
        return F.normalize(self.visual(images.to(dtype)).float(), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.head(self.features(images))


def zero_shot_logits(image_features: torch.Tensor, class_weights: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP zero-shot logits from image features (any norm) and L2-normalized class embeddings."""
    return logit_scale * F.normalize(image_features.float(), dim=-1) @ class_weights.float().t()


def _module_dtype(module: nn.Module) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point() and not param.requires_grad:
            return param.dtype
    return next(module.parameters()).dtype
