"""The layering the docs promise (docs/architecture.md): no import cycle, no arrow up the layers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycle_and_no_upward_arrow():
    ig = _import_graph()
    g = ig.build_graph()
    assert ig.cycles(g.edges) == []
    assert ig.upward(g.edges) == []
    assert "kd_train.engine" in g.edges["kd_train.train"]  # train runs the engine, and nothing runs back
    assert {"kd_cache.codec", "kd_train.engine", "kd_eval.demo", "cli.main"} <= set(g.edges)


def test_the_checker_finds_a_cycle_and_an_upward_arrow():
    ig = _import_graph()
    edges = {"kd_cache.a": {"kd_cache.b"}, "kd_cache.b": {"kd_cache.a"}, "kd_train.x": set(), "kd_cache.c": {"kd_train.x"}}
    assert ig.cycles(edges) == [["kd_cache.a", "kd_cache.b"]]
    assert ig.upward(edges) == [("kd_cache.c", "kd_train.x")]
