"""Methods, each one object with `fit(ctx)` and `logits(...)`, in one registry; each module registers its
method(s) when imported here."""
from clipconv.methods import clip_lora, cocoop, coop, finetune, linear_probe, robust, tip_adapter, zero_shot
from clipconv.methods.base import METHODS, FitContext, Method, build_method, method_names, register_method

__all__ = ["METHODS", "FitContext", "Method", "build_method", "method_names", "register_method",
           "clip_lora", "cocoop", "coop", "finetune", "linear_probe", "robust", "tip_adapter", "zero_shot"]
