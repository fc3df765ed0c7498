"""The README is the contract with users: its Python blocks run, and its command lines name commands
and options that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from modelsense.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _command_lines() -> list[list[str]]:
    """Each `modelsense ...` command of the bash blocks, continuation lines joined, as argv words."""
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("modelsense "):
                lines.append(line.split()[1:])
    return lines


def test_readme_command_lines_name_commands_and_options_that_exist():
    root = typer.main.get_command(app)
    lines = _command_lines()
    assert len(lines) > 20
    for argv in lines:
        command, words = root, list(argv)
        while words and hasattr(command, "commands") and words[0] in command.commands:
            command = command.commands[words.pop(0)]
        assert not hasattr(command, "commands"), f"README: `modelsense {' '.join(argv)}` names no command"
        known = {opt for p in command.params for opt in (*p.opts, *getattr(p, "secondary_opts", []))}
        unknown = [w for w in words if w.startswith("--") and w not in known]
        assert not unknown, f"README: `modelsense {' '.join(argv)}`: no option {unknown}"


def test_readme_command_line_check_rejects_a_made_up_option(monkeypatch):
    text = README.read_text()
    line = next(line for line in text.splitlines() if line.startswith("modelsense train "))
    made_up = text.replace(line, line.replace("modelsense train ", "modelsense train --no-such-option "))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: made_up)
    with pytest.raises(AssertionError, match="no-such-option"):
        test_readme_command_lines_name_commands_and_options_that_exist()


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    code = "\n".join(_blocks("python"))
    assert "make_attributor" in code and "execute(" in code
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "noisy-api" / "metrics.json").exists()
