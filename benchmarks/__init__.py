"""`mb2po-bench NAME [--flag value ...]`: throughput benchmarks, each printing one JSON object on stdout.

Each benchmark is a module `benchmarks.<name>` with `run(**kwargs) -> dict`; its flags are read off
`run`'s signature (`--obs_dim 11`, `--hidden_dims 256,256,256`, `--compare_torch` / `--no-compare_torch`),
so a benchmark gains a flag by gaining a keyword argument. Progress goes to stderr; anything a benchmark
prints to stdout is moved to stderr too, so stdout holds exactly the one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import sys
from typing import Any, Callable, Sequence

from benchmarks.common import MissingDependency
from mb2po_jax.errors import Mb2poError

# name -> module; a module not written yet is reported as "not available", not as an unknown name.
BENCHMARKS = {
    "awac": "benchmarks.awac",
    "rollout": "benchmarks.rollout",
    "dynamics": "benchmarks.dynamics",
    "mb2po": "benchmarks.mb2po",
    "all": "benchmarks.all",
}


def _fail(msg: str, code: int) -> None:
    print(f"mb2po-bench: {msg}", file=sys.stderr)
    sys.exit(code)


def _load(name: str) -> Callable[..., dict]:
    module_name = BENCHMARKS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the module exists but one of its imports is missing: a real error
            raise
        _fail(f"benchmark '{name}' not available (no module {module_name} yet)", 1)
    if not callable(getattr(module, "run", None)):
        _fail(f"benchmark '{name}' not available ({module_name} has no run())", 1)
    return module.run


def _sequence_parser(element: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(element(x) for x in text.split(",") if x.strip())

    parse.__name__ = f"comma-separated {element.__name__}s"
    return parse


def _parser(name: str, run: Callable[..., dict]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"mb2po-bench {name}", description=(inspect.getdoc(run) or "").split("\n\n")[0]
    )
    for param in inspect.signature(run).parameters.values():
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            continue
        flag, default = f"--{param.name}", param.default
        if default is param.empty:
            parser.add_argument(flag, required=True, type=str)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, (tuple, list)):
            element = type(default[0]) if default else str
            parser.add_argument(flag, type=_sequence_parser(element), default=default,
                                help=f"comma-separated (default: {','.join(map(str, default))})")
        elif isinstance(default, (int, float, str)):
            parser.add_argument(flag, type=type(default), default=default, help=f"(default: {default})")
        else:  # None or anything else: passed through as a string
            parser.add_argument(flag, type=str, default=default)
    return parser


def _jsonable(x: Any) -> Any:
    """Plain JSON: numpy/jax scalars and arrays to Python, non-finite floats to null (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def run(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: mb2po-bench NAME [flags]   NAME in {{{', '.join(BENCHMARKS)}}};\n"
              "       mb2po-bench NAME --help lists a benchmark's flags", file=sys.stderr)
        sys.exit(0 if argv else 2)
    name = argv[0]
    if name not in BENCHMARKS:
        _fail(f"unknown benchmark '{name}' (choose from {', '.join(BENCHMARKS)})", 2)
    bench = _load(name)
    kwargs = vars(_parser(name, bench).parse_args(argv[1:]))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = bench(**kwargs)
    except (MissingDependency, Mb2poError) as e:
        _fail(str(e), 1)
    print(json.dumps(_jsonable(result)), flush=True)
