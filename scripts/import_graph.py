"""kd's import graph from the source (ast, nothing imported): cycles, upward arrows between layers, and the
function-local imports that hide dependencies.

    python scripts/import_graph.py            # summary; exit 1 on a cycle or an upward arrow
    python scripts/import_graph.py --local    # also list every function-local import with its line

Layers, bottom to top: kd_cache < kd_train < kd_eval < cli. An arrow may point down or sideways, never up. Every
import counts, module-level or inside a function (a deferred import is still a dependency).
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kd_cache", "kd_train", "kd_eval", "cli")
LAYER = {name: i for i, name in enumerate(PACKAGES)}


@dataclass
class Graph:
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> project modules it imports
    local: list[tuple[str, int, str, bool]] = field(default_factory=list)  # (module, line, imported, own)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, node: ast.ImportFrom | ast.Import, modules: set[str]) -> list[str]:
    """Project modules named by one import statement (`from pkg import mod` names pkg.mod when it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        pkg = mod.split(".")[: len(mod.split(".")) - node.level]
        base = ".".join(pkg + ([base] if base else []))
    if base.split(".")[0] not in PACKAGES:
        return []
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in modules else base)
    return out


def build_graph() -> Graph:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {_module_name(p) for p in files}
    g = Graph()
    for path in files:
        mod = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        g.edges.setdefault(mod, set())
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_func = {id(x) for f in funcs for x in ast.walk(f) if isinstance(x, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [t for t in _resolve(mod, node, modules) if t != mod]
            g.edges[mod].update(t for t in targets if t in modules or t in PACKAGES)
            if id(node) in in_func:
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                g.local.append((mod, node.lineno, ("." * getattr(node, "level", 0)) + (name or ""), bool(targets)))
    return g


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, bs in edges.items() for b in bs
                  if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--local", action="store_true", help="list every function-local import")
    args = ap.parse_args(argv)
    g = build_graph()
    found, up = cycles(g.edges), upward(g.edges)
    own = sum(1 for *_, is_own in g.local if is_own)
    print(f"{len(g.edges)} modules, {sum(map(len, g.edges.values()))} import arrows; "
          f"{len(g.local)} function-local imports ({own} of kd's own modules)")
    for c in found:
        print("cycle: " + " <-> ".join(c))
    for a, b in up:
        print(f"upward arrow: {a} -> {b}")
    if args.local:
        for mod, line, name, is_own in sorted(g.local):
            print(f"  {mod}:{line} {name}{'  (own)' if is_own else ''}")
    return 1 if found or up else 0


if __name__ == "__main__":
    sys.exit(main())
