"""The documentation's commands, links and size: README.md, docs/*.md and the mini CLIP card.

Every command the docs show — each line of a ```bash / ```sh / ```shell block, each `$ ` line of a
```console block, and each inline `python scripts/...`, `python -m pytest ...`, `clipconv-...` or
`torchrun ...` span — must name a script that exists, and the script's own argument parser must accept
its flags. The flags are parsed in-process, never run: the parser comes from the module the script
imports `main` from (read off the script's `from X import main` line, so the check follows the package
when modules move): its `build_parser()` (staged like the script: `build_parser(method=...)` gets the
`--method` given), else `main(args)` with `ArgumentParser.parse_args` stopped right after parsing.

The cheap commands of fenced blocks (`--help`, `--list-methods`, `cache.py info`, `check_data.py` on
your own folders) also run as subprocesses (OMP_NUM_THREADS=1) and must exit 0. Long ones (training,
Table 2, benchmarks) are only parsed here; `-m slow` runs the README's main demo command end to end.
"""
from __future__ import annotations

import argparse
import configparser
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from unittest import mock

import pytest
import torch

from clipconv.runtime import progress

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_LIMIT = 15_000  # bytes
DOC_PAGES = ("README.md", "methods.md", "data.md", "run-folder.md", "robustness.md", "scale.md",
             "performance.md", "failure-modes.md", "extending.md", "demo.md", "architecture.md")
MAIN_DEMO = ["python", "scripts/train_imagenet_fs.py", "--shots", "16", "--demo"]


def doc_files() -> list[Path]:
    """README.md, docs/*.md and the markdown beside the shipped assets (the mini CLIP card)."""
    return [README, *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "clipconv" / "assets").glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# ---------------------------------------------------------------------------------------------------
# Commands in the docs

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
COMMAND_START = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?:python3?\s+(?:scripts/|-m\s+pytest)|clipconv-|torchrun\s)")
OPTIONAL_GROUP = re.compile(r"\[(\s*-[^\[\]]*)\]")  # `[--verify]`, `[--templates dataset]`: checked as if given
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "&"}


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str
    fenced: bool

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _fenced_lines(text: str):
    """(line number, line, fence language or None) for every line of a markdown text."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = (match.group(1), match.group(2).lower())
                continue
            yield number, line, None
        elif match and match.group(1).startswith(fence[0]) and not match.group(2):
            fence = None
        else:
            yield number, line, fence[1]


def extract_commands(path: Path) -> list[Command]:
    text = path.read_text(encoding="utf-8")
    commands: list[Command] = []
    pending: Optional[tuple[int, str]] = None
    paragraph: list[tuple[int, str]] = []

    def inline_spans() -> None:
        if not paragraph:
            return
        start = paragraph[0][0]
        joined = "\n".join(line for _, line in paragraph)
        for match in INLINE.finditer(joined):
            span = " ".join(match.group(1).replace("\\|", "|").split())
            if COMMAND_START.match(span) and not re.fullmatch(r"clipconv-[\w-]+", span):  # a bare name is no command
                commands.append(Command(rel(path), start + joined.count("\n", 0, match.start()), span, fenced=False))
        paragraph.clear()

    for number, line, lang in _fenced_lines(text):
        if lang is None:
            if line.strip():
                paragraph.append((number, line))
            else:
                inline_spans()
            continue
        inline_spans()
        if lang not in SHELL_LANGS:
            continue
        if pending is None:
            if lang == "console":
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            pending = (number, line.strip())
        else:
            pending = (pending[0], pending[1] + " " + line.strip())
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
            continue
        commands.append(Command(rel(path), pending[0], pending[1], fenced=True))
        pending = None
    inline_spans()
    return commands


@dataclass(frozen=True)
class Invocation:
    kind: str  # "script", "pytest" or "console"
    target: str  # scripts/X.py, or the console script's name
    args: tuple[str, ...]
    torchrun: bool = False


def words_of(command: Command) -> list[str]:
    words = shlex.split(OPTIONAL_GROUP.sub(r"\1", command.text), comments=True)
    for i, word in enumerate(words):
        if word in SHELL_OPERATORS:
            words = words[:i]
            break
    while words and ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    return words


def invocation(command: Command) -> Optional[Invocation]:
    words = words_of(command)
    if not words:
        return None
    if words[0] in ("python", "python3") and len(words) > 1:
        if words[1:3] == ["-m", "pytest"]:
            return Invocation("pytest", "pytest", tuple(words[3:]))
        if words[1].startswith("scripts/"):
            return Invocation("script", words[1], tuple(words[2:]))
        return None
    if words[0] == "torchrun":
        script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        assert script is not None, f"{command.id}: torchrun without a script: {command.text}"
        return Invocation("script", words[script], tuple(words[script + 1:]), torchrun=True)
    if words[0].startswith("clipconv-"):
        return Invocation("console", words[0], tuple(words[1:]))
    return None


def all_commands() -> list[tuple[Command, Invocation]]:
    found = []
    for path in doc_files():
        for command in extract_commands(path):
            inv = invocation(command)
            if inv is not None:
                found.append((command, inv))
    return found


COMMANDS = all_commands()


def is_cheap(inv: Invocation) -> bool:
    """Commands worth running in the default suite: quick, no training, nothing deleted."""
    if inv.kind != "script" or inv.torchrun:
        return False
    if {"--help", "-h", "--list-methods"} & set(inv.args):
        return True
    name = Path(inv.target).name
    if name == "cache.py":
        return inv.args[:1] == ("info",)
    if name == "check_data.py":  # own folders: the test makes them; --demo would generate the world (~45 s)
        return "--train-root" in inv.args and not {"--demo", "--data-root"} & set(inv.args)
    return False


def _ids(pairs) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for command, _ in pairs:
        seen[command.id] = seen.get(command.id, 0) + 1
        ids.append(command.id if seen[command.id] == 1 else f"{command.id}#{seen[command.id]}")
    return ids


def _cheap_once() -> list[tuple[Command, Invocation]]:
    """The cheap fenced commands, each distinct one once (README and docs/ repeat some)."""
    seen, run = set(), []
    for command, inv in COMMANDS:
        if command.fenced and is_cheap(inv) and inv not in seen:
            seen.add(inv)
            run.append((command, inv))
    return run


RUN = _cheap_once()


# ---------------------------------------------------------------------------------------------------
# Parsing a command's flags with the script's own parser, without running it

SUBCOMMAND = re.compile(r"""sys\.argv\[1:2\]\s*==\s*\[\s*["']([\w-]+)["']\s*\]\s*:\s*\n\s+from\s+([\w.]+)\s+import\s+main\b""")
MAIN_IMPORT = re.compile(r"^from\s+([\w.]+)\s+import\s+main\b", re.M)


class _Parsed(Exception):
    """Raised right after `main()`'s parser accepted the arguments: nothing else runs."""


def script_entry(script: str, args: tuple[str, ...]) -> tuple[object, tuple[str, ...]]:
    """(module holding the script's `main`, the arguments that module parses)."""
    path = REPO / script
    assert path.is_file(), f"{script} does not exist"
    source = path.read_text(encoding="utf-8")
    for word, module in SUBCOMMAND.findall(source):  # e.g. `benchmark.py loaders ...`
        if args[:1] == (word,):
            return importlib.import_module(module), args[1:]
    match = MAIN_IMPORT.search(source)
    if match:
        return importlib.import_module(match.group(1)), args
    spec = importlib.util.spec_from_file_location(f"_doc_script_{path.stem}", path)  # main defined in the script
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, args


def console_entry(name: str) -> object:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg", encoding="utf-8")
    scripts = {}
    if cfg.has_option("options.entry_points", "console_scripts"):
        for line in cfg.get("options.entry_points", "console_scripts").splitlines():
            if "=" in line:
                key, value = (part.strip() for part in line.split("=", 1))
                scripts[key] = value
    pyproject = REPO / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        scripts.update(tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("scripts", {}))
    assert name in scripts, f"console script {name} is not declared (known: {sorted(scripts)})"
    return importlib.import_module(scripts[name].split(":")[0])


def _staged_arguments(build_parser, args: tuple[str, ...]) -> dict:
    """`build_parser(method=...)`-style stages: each parameter gets the value of its flag, when given."""
    kwargs = {}
    for name in inspect.signature(build_parser).parameters:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--" + name.replace("_", "-"), dest="value", default=None)
        value = pre.parse_known_args(list(args))[0].value
        if value is not None:
            kwargs[name] = value
    return kwargs


def parse_only(module, args: tuple[str, ...], what: str) -> str:
    """Parse `args` with the module's parser; fail naming `what` unless accepted. Returns the output
    (the help text for --help)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            build = getattr(module, "build_parser", None)
            if build is not None:
                build(**_staged_arguments(build, args)).parse_args(list(args))
            else:
                real = argparse.ArgumentParser.parse_args

                def parse_then_stop(self, parsed=None, namespace=None):
                    real(self, parsed, namespace)
                    raise _Parsed

                with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
                    try:
                        module.main(list(args))
                    except _Parsed:
                        pass
                    else:
                        pytest.fail(f"{what}: {module.__name__}.main() returned without parsing its arguments")
    except SystemExit as exit:
        if exit.code not in (0, None):
            pytest.fail(f"{what}: the parser rejects it: {err.getvalue().strip()}")
    except KeyError as error:  # e.g. build_parser(method=<unknown>)
        pytest.fail(f"{what}: unknown name {error}")
    return out.getvalue()


def substitute(args: tuple[str, ...], data: Path) -> tuple[str, ...]:
    return tuple(re.sub(r"\$\{?DATA\}?", str(data), a) for a in args)


@pytest.mark.parametrize("command, inv", COMMANDS, ids=_ids(COMMANDS))
def test_documented_command_parses(command: Command, inv: Invocation, tmp_path):
    what = f"{command.id}: `{command.text}`"
    args = substitute(inv.args, tmp_path)
    if inv.kind == "pytest":
        for arg in args:
            if arg.startswith("tests/") or arg.endswith(".py"):
                assert (REPO / arg.split("::")[0]).exists(), f"{what}: {arg} does not exist"
        return
    if inv.kind == "console":
        module = console_entry(inv.target)
    else:
        module, args = script_entry(inv.target, args)
    parse_only(module, args, what)


def test_every_script_takes_help():
    """The docs say every script takes --help."""
    for script in sorted((REPO / "scripts").glob("*.py")):
        module, args = script_entry(rel(script), ("--help",))
        assert "usage:" in parse_only(module, args, f"{rel(script)} --help")


# ---------------------------------------------------------------------------------------------------
# Running the cheap ones

def _env(cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CLIPCONV_CACHE": str(cache), "MPLBACKEND": "Agg"}


def _tiny_class_folders(root: Path, args: tuple[str, ...]) -> None:
    """The folders --train-root / --eval-set name, each with 2 classes of 2 small JPEGs."""
    from PIL import Image

    folders = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--train-root"]
    folders += [args[i + 1].split("=", 1)[1] for i, a in enumerate(args[:-1]) if a == "--eval-set" and "=" in args[i + 1]]
    for folder in folders:
        for c, name in enumerate(("red_fox", "grey_wolf")):
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (40 * c + 10 * i, 90, 160)).save(root / folder / name / f"{i}.jpg")


def run_documented(inv: Invocation, cwd: Path, cache: Path, timeout: float) -> subprocess.CompletedProcess:
    args = substitute(inv.args, cwd / "data")
    return subprocess.run([sys.executable, str(REPO / inv.target), *args], cwd=cwd, env=_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(inv: Invocation, cwd: Path, cache: Path, monkeypatch) -> int:
    """The script run as `python <script> <args>` would run it, in this process (no interpreter start-up and
    torch import per command: seconds each on a busy machine); returns its exit code. Global state a CLI sets
    (quiet progress, the warnings format, torch's thread count) is restored afterwards."""
    args = substitute(inv.args, cwd / "data")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("CLIPCONV_CACHE", str(cache))
    monkeypatch.setattr(sys, "argv", [str(REPO / inv.target), *args])
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    threads, quiet = torch.get_num_threads(), progress.is_quiet()
    try:
        runpy.run_path(str(REPO / inv.target), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        torch.set_num_threads(threads)
        progress.set_quiet(quiet)
    return code


@pytest.mark.parametrize("command, inv", RUN, ids=_ids(RUN))
def test_cheap_documented_command_runs(command: Command, inv: Invocation, tmp_path, monkeypatch, capsys):
    if Path(inv.target).name == "check_data.py":
        _tiny_class_folders(tmp_path, inv.args)
    code = run_in_process(inv, tmp_path, tmp_path / "cache", monkeypatch)
    out = capsys.readouterr()
    assert code == 0, f"{command.id}: `{command.text}` exited {code}\n{out.out[-2000:]}\n{out.err[-2000:]}"


def test_the_docs_have_commands_to_run_and_check():
    """Guards the extraction itself: a broken fence parser would otherwise pass everything."""
    readme = [c.text for c, _ in COMMANDS if c.doc == "README.md" and c.fenced]
    assert "python -m pytest" in [" ".join(c.split()[:3]) for c in readme], "the README must keep `python -m pytest`"
    assert any(words_of(c) == MAIN_DEMO for c, _ in COMMANDS if c.doc == "README.md"), "the README's main demo command"
    assert len(COMMANDS) >= 30 and len(RUN) >= 3
    assert {Path(i.target).name for _, i in RUN} >= {"cache.py", "check_data.py", "train_imagenet_fs.py"}


@pytest.mark.slow
def test_readme_main_demo_command_runs_end_to_end(tmp_path):
    """`python scripts/train_imagenet_fs.py --shots 16 --demo` as the README gives it (generates the demo
    world into a fresh cache, ~45 s, then trains; minutes on a busy 2-core CPU), then `check_data.py --demo`."""
    command, inv = next((c, i) for c, i in COMMANDS if c.doc == "README.md" and words_of(c) == MAIN_DEMO)
    result = run_documented(inv, tmp_path, tmp_path / "cache", timeout=3600)
    assert result.returncode == 0, f"{command.id}: exited {result.returncode}\n{result.stderr[-3000:]}"
    (run_dir,) = (tmp_path / "runs").iterdir()
    for name in ("config.json", "split.json", "adapter.safetensors", "metrics.json", "results.md", "run_summary.json"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics) == ["source", "v2", "sketch", "adversarial", "rendition"]
    check = next((i for c, i in COMMANDS if words_of(c) == ["python", "scripts/check_data.py", "--demo"]), None)
    assert check is not None, "the docs should show `python scripts/check_data.py --demo`"
    result = run_documented(check, tmp_path, tmp_path / "cache", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# Size, pages, links, python snippet

def test_readme_is_at_most_15000_bytes():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size:,} bytes; move detail into docs/ (limit {README_LIMIT:,})"


def test_docs_pages_exist():
    missing = [page for page in DOC_PAGES if not (REPO / "docs" / page).is_file()]
    assert not missing, f"docs/ lacks {missing}"


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def _links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line, lang in _fenced_lines(path.read_text(encoding="utf-8")):
        if lang is not None:
            continue
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        found += [(number, m.group(1)) for m in LINK.finditer(line)]
        found += [(number, m.group(1)) for m in REFERENCE.finditer(line)]
    return found


def test_relative_links_point_to_files_in_the_repository():
    broken = []
    for path in doc_files():
        for number, target in _links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # https:, mailto:, an anchor on the same page
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.exists() or REPO.resolve() not in (resolved, *resolved.parents):
                broken.append(f"{rel(path)}:{number}: {target}")
    assert not broken, "links to missing files or outside the repository:\n" + "\n".join(broken)


def test_nothing_points_at_the_shared_folder():
    hits = [f"{rel(p)}:{n}" for p in doc_files() for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if "../shared" in line or "/shared/" in line]
    assert not hits, f"the docs must stand alone, no ../shared: {hits}"


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a markdown file, each as one source text."""
    blocks, current = [], None
    for _, line, lang in _fenced_lines(path.read_text(encoding="utf-8")):
        if lang == "python":
            current = current if current is not None else []
            current.append(line)
        elif current is not None:
            blocks.append("\n".join(current))
            current = None
    if current is not None:
        blocks.append("\n".join(current))
    return blocks


def test_readme_python_snippet_runs(monkeypatch):
    """The README's library example, as written (it loads the shipped mini CLIP from the checkout)."""
    blocks = python_blocks(README)
    assert blocks, "the README shows no python example"
    monkeypatch.chdir(REPO)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_snippet"})
