"""Methods, each one object with `fit(ctx)` and `logits(...)`, in one registry."""
from .base import METHODS, FitContext, Method, build_method, method_names, register_method

__all__ = ["METHODS", "FitContext", "Method", "build_method", "method_names", "register_method"]
