"""MkDocs hooks: the command-line reference page is generated from the typer app while the site builds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SRC = str(_HERE.parent / "src")
if _SRC not in sys.path:  # the package of this checkout, installed or not
    sys.path.insert(0, _SRC)


def _gen_cli():
    spec = importlib.util.spec_from_file_location("modelsense_docs_gen_cli", _HERE / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - the MkDocs hook signature
    gen = _gen_cli()
    return markdown.replace(gen.PLACEHOLDER, gen.cli_markdown()) if gen.PLACEHOLDER in markdown else markdown
