"""The import rules of the layout (issue 20, item 2), read from the source (every import,
function-local ones too):

- ``drivers`` and ``sims`` import nothing of ours (they stand alone on a bench or in a test);
- ``calibration`` imports ``drivers`` only (it measures through instruments, never the
  simulator's hidden truth);
- no library module of ``hil`` imports the top layer (``hil.commands``, ``hil.cli``, ``hil.jobs``,
  ``hil.api``): the commands and the jobs sit on the library, never the other way;
- ``hil``'s sub-packages keep their order: ``network`` (model, engines, tasks) and ``bench`` (lab
  configs, instruments) import no other sub-package; ``training`` only ``network``; ``conv`` only
  ``bench``; ``chip`` those three; the core modules (``hil.config``, ``hil.runs``, ...) none;
- the module-level import graph has no cycle.

Each rule is also shown to fail on an injected violation.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hil", "drivers", "calibration", "sims")
#: what each top-level package may import of ours (besides itself)
ALLOWED = {"drivers": set(), "sims": set(), "calibration": {"drivers"},
           "hil": {"drivers", "calibration", "sims"}}
#: hil modules that are the command layer (may import hil.commands)
COMMAND_LAYER = ("hil.commands", "hil.cli", "hil.__main__")
#: the top layer: what the library never imports (the package itself exposes the API lazily)
TOP_LAYER = ("hil.commands", "hil.cli", "hil.__main__", "hil.jobs", "hil.api")
#: which sub-packages of hil each one may import (besides itself and the core modules)
SUBPACKAGES = {"network": set(), "bench": set(), "training": {"network"}, "conv": {"bench"},
               "chip": {"network", "training", "bench"}}


def _layer(name: str) -> str:
    """``top``, a sub-package's name, ``core`` (hil's own modules such as hil.config) or ``pkg``
    (the ``hil`` package itself)."""
    if name == "hil":
        return "pkg"
    if name.startswith(TOP_LAYER):
        return "top"
    part = name.split(".")[1]
    return part if part in SUBPACKAGES else "core"


def sources() -> dict[str, str]:
    return dict(_sources())


@functools.cache
def _sources() -> tuple[tuple[str, str], ...]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f.read_text(encoding="utf-8")
    return tuple(out.items())


@functools.cache
def imports(src: str, module_level_only: bool = False) -> frozenset[str]:
    """Modules of ours that ``src`` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(src)
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names}
    return frozenset(m for m in out if m.split(".")[0] in PACKAGES)


def violations(mods: dict[str, str]) -> list[str]:
    """Every broken rule, one line each (empty: the layout holds)."""
    bad = []
    for name, src in mods.items():
        top = name.split(".")[0]
        for imp in sorted(imports(src)):
            other = imp.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                bad.append(f"{name} imports {imp} ({top} may import "
                           f"{', '.join(sorted(ALLOWED[top])) or 'nothing of ours'})")
            if (top == "hil" and imp.startswith("hil.commands")
                    and not name.startswith(COMMAND_LAYER)):
                bad.append(f"{name} imports {imp} (library code never imports the commands)")
            if top == "hil" and other == "hil" and imp != "hil":
                bad += _layer_violation(name, imp, mods)
    bad += [f"import cycle: {' -> '.join(c)}" for c in cycles(mods)]
    return bad


def _layer_violation(name: str, imp: str, mods: dict[str, str]) -> list[str]:
    """The layering rules for one import inside ``hil``."""
    target = _resolve(imp, mods)
    if target is None or target == "hil":
        return []
    mine, theirs = _layer(name), _layer(target)
    if mine in ("top", "pkg") or mine == theirs:
        return []
    if theirs == "top" and not (name.startswith(COMMAND_LAYER) or imp.startswith("hil.commands")):
        return [f"{name} imports {imp} (library code never imports the top layer: "
                f"{', '.join(TOP_LAYER[:1] + TOP_LAYER[3:])}, hil.cli)"]
    if theirs in SUBPACKAGES and (mine == "core" or theirs not in SUBPACKAGES[mine]):
        allowed = "none" if mine == "core" else ", ".join(sorted(SUBPACKAGES[mine])) or "none"
        return [f"{name} imports {imp} (hil.{mine} may import the sub-packages: {allowed})"]
    return []


def _resolve(name: str, mods: dict[str, str]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def cycles(mods: dict[str, str]) -> list[list[str]]:
    """Cycles of the module-level import graph (strongly connected parts of more than one)."""
    graph = {m: {r for i in imports(src, module_level_only=True)
                 if (r := _resolve(i, mods)) is not None and r != m} for m, src in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_layout_keeps_its_import_rules():
    assert violations(sources()) == []


@pytest.mark.parametrize("module, code, words", [
    ("drivers.rf_source", "from hil.errors import HilError\n", "drivers.rf_source imports hil.errors"),
    ("sims.spindiode", "def f():\n    import calibration.chain\n", "sims.spindiode imports calibration"),
    ("calibration.chain", "from sims.spindiode import chain_network\n", "calibration.chain imports sims"),
    ("hil.chip.study", "def f():\n    from hil.commands.train import run\n", "never imports the commands"),
    ("hil.network.model", "import hil.training.train\n", "hil.network may import the sub-packages: none"),
    ("hil.training.train", "def f():\n    from hil.jobs import train_run\n", "never imports the top layer"),
    ("hil.training.tune", "def f():\n    from hil.cli import main\n", "never imports the top layer"),
    ("hil.runs", "def f():\n    from hil.network.model import DynamicalNetwork\n",
     "hil.core may import the sub-packages: none"),
    ("hil.conv.hybrid", "from hil.chip.twin import Twin\n", "hil.conv may import the sub-packages: bench"),
    ("hil.network.tasks", "from hil.training.train import Trainer\n", "import cycle"),
])
def test_an_injected_violation_is_caught(module, code, words):
    mods = sources()
    mods[module] = code + mods[module]
    assert any(words in v for v in violations(mods)), violations(mods)


def test_the_command_layer_may_import_commands():
    mods = sources()
    mods["hil.cli"] = "from hil.commands.train import run\n" + mods["hil.cli"]
    assert violations(mods) == violations(sources())
