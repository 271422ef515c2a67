"""A DVC stage's code deps are the project files its command imports, found here from the code.

A hand-kept `deps:` list drifts: a file the stage runs but does not list lets `dvc repro` keep
a stale result. So the list is derived (a static walk over the imports, lazy ones included),
checked by a test, and written into dvc.yaml by `pipeline deps` (`make deps`). Only `import_closure` and
`stage_roots` are stdlib-only; reading dvc.yaml needs PyYAML (a dependency of the project).
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.files import write_text

SRC = "src"  # the folder on sys.path that holds the project's packages, beside dvc.yaml


def _module_file(name: str, src: Path) -> Path | None:
    """The file that importing `name` runs; None if it is not a project module (or a namespace package)."""
    base = src.joinpath(*name.split("."))
    for file in (base / "__init__.py", base.with_name(base.name + ".py")):
        if file.is_file():
            return file
    return None


def _prefixes(name: str) -> list[str]:
    """Importing `a.b.c` runs `a`, then `a.b`, then `a.b.c`."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _imported_names(file: Path, module: str) -> Iterator[str]:
    """Every module name the file may import: anywhere in it, function bodies and TYPE_CHECKING
    blocks included. `from m import x` yields `m.x` too, which counts if `x` is a submodule
    (`from m import *` does not: it would need m's `__all__`, and no module here uses it)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _prefixes(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            yield from _prefixes(base)
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def import_closure(roots: Iterable[str], src: Path) -> list[Path]:
    """The project files that running the root modules imports, transitively, sorted and relative
    to `src.parent` (e.g. `src/pipeline/config.py`). Modules not under `src` are left out."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = []
    for root in roots:
        if _module_file(root, src) is None:
            raise ModuleNotFoundError(f"{root} is not a module under {src}")
        todo.extend(_prefixes(root))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if (file := _module_file(name, src)) is not None:
            files.add(file)
            todo.extend(_imported_names(file, name))
    return sorted((f.relative_to(src.parent) for f in files), key=Path.as_posix)


def stage_roots(cmd: str) -> list[str]:
    """The project modules a stage command runs: `python -m pipeline.cli.stages train` runs the
    runner and the task module its `STAGES` table names for `train`; `python -m pkg.mod` runs
    `pkg.mod`. Any other command has none, and its deps are left alone."""
    from pipeline.cli.stages import STAGES, stage_modules

    args = shlex.split(cmd)
    if len(args) >= 3 and Path(args[0]).name.startswith("python") and args[1] == "-m":
        if args[2] == "pipeline.cli.stages" and len(args) >= 4 and args[3] in STAGES:
            return [args[2], *stage_modules(args[3])]
        return [args[2]]
    return []


@dataclass
class _Stage:
    name: str
    node: yaml.MappingNode
    deps: yaml.Node | None
    want: list[str]  # the import closure
    have: list[str]  # the code deps dvc.yaml lists


def _value(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    return next((v for k, v in node.value if k.value == key), None)


def _is_code(dep: str, root: Path) -> bool:
    """Python files and folders under src/; another file there would be data the code reads."""
    under = dep == SRC or dep.startswith(SRC + "/")
    return under and (dep.endswith(".py") or (root / dep).is_dir())


def _stages(dvc_yaml: Path, text: str) -> Iterator[_Stage]:
    """The stages whose command runs project modules; a root that is not one raises."""
    root = dvc_yaml.parent
    stages = _value(yaml.compose(text), "stages")
    for key, node in stages.value if stages else []:
        cmd = _value(node, "cmd")
        cmds = cmd.value if isinstance(cmd, yaml.SequenceNode) else [cmd] if cmd else []
        roots = [r for c in cmds for r in stage_roots(c.value)]
        if not roots:
            continue
        deps = _value(node, "deps")
        listed = [d.value for d in deps.value if isinstance(d, yaml.ScalarNode)] \
            if isinstance(deps, yaml.SequenceNode) else []
        try:
            want = [p.as_posix() for p in import_closure(roots, root / SRC)]
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(f"stage {key.value!r}: {err}") from err
        yield _Stage(key.value, node, deps, want, [d for d in listed if _is_code(d, root)])


def check(dvc_yaml: Path) -> list[str]:
    """What is wrong with each stage's code deps: a file its command imports that is not listed,
    or a listed file or folder under src/ it does not import. Empty when every list is exact."""
    try:
        stages = list(_stages(dvc_yaml, dvc_yaml.read_text(encoding="utf-8")))
    except ModuleNotFoundError as err:
        return [str(err)]
    problems = []
    for stage in stages:
        problems += [f"stage {stage.name!r}: deps lack {p}, which its command imports"
                     for p in stage.want if p not in stage.have]
        problems += [f"stage {stage.name!r}: deps list {p}, which its command does not import"
                     + (" (a folder: list the files instead)" if (dvc_yaml.parent / p).is_dir() else "")
                     for p in stage.have if p not in stage.want]
    return problems


def write(dvc_yaml: Path) -> bool:
    """Make each stage's code deps exactly its import closure, sorted, where its first code dep
    was. Other deps, other keys and comments keep their lines: this edits lines, not YAML.
    Returns whether the file changed."""
    text = dvc_yaml.read_text(encoding="utf-8")
    lines = [line if line.endswith("\n") else line + "\n" for line in text.splitlines(keepends=True)]
    edits: dict[int, list[str]] = {}  # line number -> the lines that replace it
    for stage in _stages(dvc_yaml, text):
        if stage.deps is None:  # a new `deps:` key, after `cmd:` if another key follows it
            keys = [k for k, _ in stage.node.value]
            mark = next((b for a, b in zip(keys, keys[1:]) if a.value == "cmd"), keys[0]).start_mark
            edits[mark.line] = [" " * mark.column + "deps:\n",
                                *(" " * (mark.column + 2) + f"- {p}\n" for p in stage.want), lines[mark.line]]
            continue
        if not isinstance(stage.deps, yaml.SequenceNode) or stage.deps.flow_style or not stage.deps.value:
            raise ValueError(f"{dvc_yaml}: stage {stage.name!r}: write needs deps as a block list, one per line")
        items = stage.deps.value
        code = [n for n in items if isinstance(n, yaml.ScalarNode) and n.value in stage.have]
        if any(n.start_mark.line != n.end_mark.line for n in code):
            raise ValueError(f"{dvc_yaml}: stage {stage.name!r}: write needs each code dep on one line")
        kept = {n.value: lines[n.start_mark.line] for n in code}  # a kept entry keeps its comment
        dash = lines[items[0].start_mark.line][: items[0].start_mark.column]
        block = [kept.get(p, f"{dash}{p}\n") for p in stage.want]
        for node in code:
            edits[node.start_mark.line] = []
        at = (code or items)[0].start_mark.line
        edits[at] = block + ([] if code else [lines[at]])
    new = "".join(part for i, line in enumerate(lines) for part in edits.get(i, [line]))
    if new == text:
        return False
    write_text(dvc_yaml, new)
    return True
