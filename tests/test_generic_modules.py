"""Generic modules name no method, adapter kind or dataset family: what differs between them is declared by
the method, kind or family itself (label, Table-2 order, published numbers, CLIP_benchmark task, torchrun
support, mergeability, check_data's hints) and read through the registries.

Scanned (GENERIC): every module of clipconv/app/ and clipconv/app/cli/ except the per-method ones, and the
library's generic modules: training, evaluation, features, merge, checkpoint, wise, params, config, registry,
methods/base.py and adapters/registry.py. Not scanned: the modules that define or serve one method, kind or
family (clipconv/methods/<method>.py, clipconv/adapters/<kind>.py, clipconv/data/family.py, imagenet.py,
wds.py, demo_world.py, ...), clipconv/app/cli/zero_shot.py (the zero-shot method's own command),
clipconv/app/bench_scale.py (the scale rehearsal: one measuring function per method) and
clipconv/adapters/inject.py (its VPT stacking rule is still by name: a known remainder).

A hit is a string literal in code equal to a registered name (or to the "adapter:" prefix) — docstrings and
help/description texts are not code. ALLOWED lists the literals that are not a lookup of a name, with why.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from clipconv.adapters import ADAPTERS
from clipconv.data import FAMILIES
from clipconv.methods.base import METHODS
from clipconv.methods.finetune import ADAPTER_METHOD_PREFIX

PACKAGE = Path(__file__).resolve().parents[1] / "clipconv"
#: per-method modules of the application: zero_shot.py is that method's own command; bench_scale.py (the scale
#: rehearsal) builds each method's own TrainingTask from its private pieces, one measuring function per method
NOT_GENERIC = {"app/cli/zero_shot.py", "app/bench_scale.py"}
GENERIC = sorted(
    {p.relative_to(PACKAGE).as_posix() for p in (*PACKAGE.glob("app/*.py"), *PACKAGE.glob("app/cli/*.py"))}
    - NOT_GENERIC
    | {"training.py", "evaluation.py", "features.py", "merge.py", "checkpoint.py", "wise.py", "params.py",
       "config.py", "registry.py", "methods/base.py", "adapters/registry.py"}
)
#: (module, literal): why it is no lookup of a registered name
ALLOWED = {
    ("checkpoint.py", "adapter"): "the checkpoint metadata key 'adapter' (the bottleneck kind shares the word)",
    ("app/cli/export_merged.py", "adapter"): "the checkpoint metadata key 'adapter'",
    ("app/wise_report.py", "zero_shot"): "the key of the α = 0 row in wise_sweep.json (an output field)",
    ("app/frontier.py", "zero_shot"): "the key of the α = 0 row of wise_sweep.json, read back",
    ("app/cli/options.py", "demo"): "the --demo flag (args.demo); its family check is left to the options rework",
    ("app/bench.py", "convpass"): "the speed benchmark's default adapter, with that kind's `dim` option",
    ("app/scale_tree.py", "coop"): "the CoOp on-disk layout of clipconv.data.synthetic.LAYOUTS, not the method",
    ("methods/base.py", "demo"): "the name of the demo preset (Method.presets, --preset demo), not the family",
}
HELP_KEYWORDS = {"help", "description", "epilog", "metavar"}


def registered_names() -> set[str]:
    return {*METHODS, *ADAPTERS, *FAMILIES, ADAPTER_METHOD_PREFIX}


def name_literals(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, literal) of every string constant in code equal to one of `names` (docstrings and help texts
    excluded)."""
    tree = ast.parse(source)
    prose = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            prose.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg in HELP_KEYWORDS:
            prose.update(id(sub) for sub in ast.walk(node.value))
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                  and id(node) not in prose)


def test_the_scan_sees_names_in_code_but_not_in_prose():
    source = '''"""zero_shot in a docstring."""
def f(method, parser):
    """convpass here too."""
    parser.add_argument("--x", help="lora " + "imagenet")
    return method == "zero_shot" or method.startswith("adapter:") or {"demo": 1}
'''
    assert name_literals(source, registered_names()) == [(5, "adapter:"), (5, "demo"), (5, "zero_shot")]


def test_the_scanned_modules_exist():
    missing = [m for m in GENERIC if not (PACKAGE / m).is_file()]
    assert not missing and len(GENERIC) > 20


@pytest.mark.parametrize("module", GENERIC)
def test_generic_module_names_no_method_kind_or_family(module):
    names = registered_names()
    hits = [f"{module}:{line}: {literal!r}" for line, literal in name_literals((PACKAGE / module).read_text(), names)
            if (module, literal) not in ALLOWED]
    assert not hits, ("a generic module names a registered method, adapter kind or family; declare what differs "
                      "on the method / kind / family and read it through the registry:\n" + "\n".join(hits))


def test_allowed_literals_are_still_there():
    """An ALLOWED entry whose literal went away is dropped from the list (it would hide a new hit)."""
    names = registered_names()
    stale = [entry for entry in ALLOWED
             if entry[1] not in {literal for _, literal in name_literals((PACKAGE / entry[0]).read_text(), names)}]
    assert not stale
