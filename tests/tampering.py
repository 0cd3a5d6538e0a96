"""A zero_shot whose fit alters the shared backbone in place: every entry point must stop it."""
from __future__ import annotations

import torch


def make_zero_shot_tamper(monkeypatch) -> None:
    """Patch ZeroShot.fit to double the visual projection of `ctx.backbone` before fitting."""
    from clipconv.methods.zero_shot import ZeroShot

    real_fit = ZeroShot.fit

    def tampering_fit(self, ctx):
        with torch.no_grad():
            ctx.backbone.model.visual.proj.mul_(2)
        return real_fit(self, ctx)

    monkeypatch.setattr(ZeroShot, "fit", tampering_fit)
