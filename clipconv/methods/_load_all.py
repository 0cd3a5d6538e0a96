"""Import every method module so that each registers itself."""
import importlib

for _module in ("zero_shot", "linear_probe", "tip_adapter", "coop", "cocoop", "finetune", "clip_lora"):
    importlib.import_module(f"{__package__}.{_module}")
