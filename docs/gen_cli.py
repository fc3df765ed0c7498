"""The command-line reference as Markdown, generated from the typer app.

Walks `typer.main.get_command(modelsense.cli.app)` (a click group): one section per command and
sub-command, with its help text and a table of its options (flags, type, default, help). The help
texts are the ones declared on the spec fields (`modelsense.options.option`), so this page cannot
drift from `modelsense COMMAND --help`. Used by `docs/hooks.py` while the site builds; run alone it
prints the page: `PYTHONPATH=src python docs/gen_cli.py`.
"""

from __future__ import annotations

from typing import Any

import typer

PLACEHOLDER = "<!-- cli-reference -->"


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _default(param: Any) -> str:
    value = param.default
    if param.is_flag:
        return "" if value is None else ("on" if value else "off")
    if value is None or callable(value) or value in ((), ""):
        return ""
    return f"`{_cell(value)}`"


def _type(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    if hasattr(param, "bare_type"):  # typer >= 0.2x (its own click)
        return _cell(param.bare_type())
    return _cell(param.type.name)  # click's Option


def _flags(param: Any) -> str:
    names = [*param.opts, *param.secondary_opts]
    return ", ".join(f"`{n}`" for n in names)


def _command(cmd: Any, path: list[str], lines: list[str], depth: int) -> None:
    name = " ".join(path)
    lines.append(f"{'#' * min(depth, 4)} `{name}`\n")
    if cmd.help:
        lines.append(_cell(cmd.help) + "\n")
    if hasattr(cmd, "list_commands"):  # a group (typer ships its own copy of click: duck typing)
        for sub_name in cmd.list_commands(None):
            _command(cmd.get_command(None, sub_name), [*path, sub_name], lines, depth + 1)
        return
    options = [p for p in cmd.params if _is_option(p) and not p.hidden]
    arguments = [p for p in cmd.params if getattr(p, "param_type_name", "") == "argument"]
    if arguments:
        lines.append("| argument | type | help |")
        lines.append("|---|---|---|")
        for a in arguments:
            name = (a.metavar or a.name.upper()) + (" ..." if a.nargs == -1 else "")
            lines.append(f"| `{name}` | {_type(a)} | {_cell(getattr(a, 'help', None) or '')} |")
        lines.append("")
    if options:
        lines.append("| option | type | default | help |")
        lines.append("|---|---|---|---|")
        for p in options:
            lines.append(f"| {_flags(p)} | {_type(p)} | {_default(p)} | {_cell(p.help or '')} |")
        lines.append("")


def cli_markdown() -> str:
    """The reference of every command of `modelsense`, as Markdown."""
    from modelsense.cli import app

    root = typer.main.get_command(app)
    lines: list[str] = []
    for name in root.list_commands(None):
        _command(root.get_command(None, name), ["modelsense", name], lines, 2)
    return "\n".join(lines)


if __name__ == "__main__":
    print(cli_markdown())
