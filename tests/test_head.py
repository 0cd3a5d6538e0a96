"""Text-initialized head: its logits equal zero-shot CLIP's before any training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_scaled

from clipconv.head import ImageClassifier, class_embeddings, text_head

CLASSNAMES = ["striped star", "dotted circle", "plain square"]
TEMPLATES = ["a photo of a {}.", "a sketch of a {}."]


def _direct_zero_shot(model, tokenizer, images):
    """CLIP's recipe written out independently: per-template normalize, average, normalize."""
    with torch.no_grad():
        rows = []
        for name in CLASSNAMES:
            text = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            rows.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=0))
        weights = torch.stack(rows)
        feats = F.normalize(model.encode_image(images), dim=-1)
        return model.logit_scale.exp() * feats @ weights.t()


def test_text_head_logits_equal_zero_shot_clip(tiny_backbone):
    model, tokenizer = tiny_backbone.model, tiny_backbone.tokenizer
    head = text_head(model, tokenizer, CLASSNAMES, TEMPLATES)
    assert head.weight.shape == (3, model.text_projection.shape[1])
    assert torch.count_nonzero(head.bias) == 0
    assert_close_scaled(head.weight.norm(dim=-1), torch.ones(3))
    classifier = ImageClassifier(model.visual, head, tiny_backbone.logit_scale)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = classifier(images)
    assert_close_scaled(got, _direct_zero_shot(model, tokenizer, images))


def test_batched_encoding_does_not_change_embeddings(tiny_backbone):
    model, tokenizer = tiny_backbone.model, tiny_backbone.tokenizer
    one = class_embeddings(model, tokenizer, CLASSNAMES, TEMPLATES, batch_size=1)
    many = class_embeddings(model, tokenizer, CLASSNAMES, TEMPLATES, batch_size=64)
    assert_close_scaled(one, many)


@pytest.mark.parametrize("templates", [["a photo of a dog."], ["{} and {}"], []])
def test_templates_without_exactly_one_placeholder_are_refused(tiny_backbone, templates):
    with pytest.raises(ValueError, match="template"):
        class_embeddings(tiny_backbone.model, tiny_backbone.tokenizer, CLASSNAMES, templates)


def test_classifier_runs_on_a_bf16_trunk(tiny_config):
    from clipconv.backbone import load_backbone

    backbone = load_backbone(str(tiny_config), pretrained=None, device="cpu", precision="bf16")
    head = text_head(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATES).float()
    logits = ImageClassifier(backbone.model.visual, head, backbone.logit_scale)(torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.float32 and logits.shape == (2, 3)
