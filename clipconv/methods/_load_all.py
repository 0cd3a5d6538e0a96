"""Import every method module so that each registers itself."""
import importlib

for _module in ("zero_shot", "linear_probe", "tip_adapter", "coop", "cocoop", "finetune"):
    try:
        importlib.import_module(f"{__package__}.{_module}")
    except ModuleNotFoundError as err:  # a method module not written yet
        if err.name != f"{__package__}.{_module}":
            raise
