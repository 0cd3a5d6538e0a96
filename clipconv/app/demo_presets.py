"""Training defaults for the miniature benchmark (`--demo`), chosen for the shipped mini CLIP.

The paper's Convpass_CLIP settings (h = 8, lr 1e-5, 50 epochs, crop scale 0.08–1) are tuned for a
768-wide ViT-B/16 on 224-px ImageNet photos. The mini CLIP is 128 wide and sees 48-px images whose
objects an 8 %-area crop often cuts away. The demo settings were picked by validation top-1 on 16
images per class drawn from the mini world's *train* pool, disjoint from the 16 shots (command:
`scripts/train_imagenet_fs.py --demo --shots 16 --val-shots 16 --epochs 30 --lr L --dim H --crop-scale C`):

| lr | h | crop scale | val top-1 (%) |
|---|---|---|---|
| 1e-5 | 8 | 0.08 (paper) | 53.5 (zero-shot level) |
| 3e-3 | 8 | 0.9 | 57.0 |
| 3e-3 | 32 | 0.5 | 64.3 |
| 3e-3 | 32 | 0.9 | **65.0** |

s = 1: at lr 1e-2, s = 10 collapsed to chance. 30 epochs of 8 steps (512 images, batch 64).
"""
from clipconv.methods.base import METHODS, method_names
from clipconv.methods.finetune import AdapterKindMethod, AdapterTuning
from clipconv.mini_clip import MINI_CLIP_CONFIG, MINI_CLIP_CROP_SCALE, MINI_CLIP_WEIGHTS

DEMO_RUN_DEFAULTS = {"crop_scale": MINI_CLIP_CROP_SCALE}

DEMO_TRAIN_DEFAULTS = {
    "convpass": {"dim": 32, "lr": 3e-3, "scales": [1.0], "epochs": 30},
    # CoCoOp's domain-generalization CoOp: 4 tokens from "a photo of a" (16 do not fit the 16-token context).
    "coop": {"n_ctx": 4, "init_phrase": "a photo of a"},
}


#: convpass's demo options that are its training recipe (the others, dim and s, are Convpass's architecture)
DEMO_TRAINING_RECIPE = ("lr", "epochs")


def demo_method_options(method: "str | None") -> dict:
    """The method's own demo options; every other adapter-tuning method (`adaptformer`, `adapter:<kind>`, ...)
    gets convpass's demo training recipe (lr, epochs) and keeps its kind's own architecture defaults."""
    if not method:
        return {}
    if method in DEMO_TRAIN_DEFAULTS:
        return dict(DEMO_TRAIN_DEFAULTS[method])

    method_names()
    cls = METHODS.get(method)
    if isinstance(cls, AdapterKindMethod) or (isinstance(cls, type) and issubclass(cls, AdapterTuning)):
        if cls.adapter_kind == "convpass":
            return dict(DEMO_TRAIN_DEFAULTS["convpass"])
        return {k: v for k, v in DEMO_TRAIN_DEFAULTS["convpass"].items() if k in DEMO_TRAINING_RECIPE}
    return {}


def demo_settings(method: "str | None" = None) -> dict:
    """What --demo sets unless a flag says otherwise: the mini CLIP, the demo crop scale and the method's
    demo options (under "method_options"); the data root (the generated world) is filled by the CLI."""

    return {"family": "demo", "model": str(MINI_CLIP_CONFIG), "pretrained": str(MINI_CLIP_WEIGHTS), **DEMO_RUN_DEFAULTS,
            "method_options": demo_method_options(method)}
