"""MkDocs hooks: the command-line reference (from the typer app) and the measured-numbers page (from the
benchmarks' recorded JSON, bench/results/) are generated while the site builds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SRC = str(_HERE.parent / "src")
if _SRC not in sys.path:  # the package of this checkout, installed or not
    sys.path.insert(0, _SRC)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"modelsense_docs_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - the MkDocs hook signature
    for name, render in (("gen_cli", "cli_markdown"), ("gen_numbers", "numbers_markdown")):
        gen = _load(name)
        if gen.PLACEHOLDER in markdown:
            markdown = markdown.replace(gen.PLACEHOLDER, getattr(gen, render)())
    return markdown
