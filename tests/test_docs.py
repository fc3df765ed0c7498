"""The documentation: every tutorial script runs, every page's snippet exists, the CLI reference lists
every command and option, and the site builds in strict mode (when mkdocs is installed)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.py"))
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.M)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    threads = env.get("MODELSENSE_TEST_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", threads)
    return env


def _gen_cli():
    spec = importlib.util.spec_from_file_location("docs_gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_tutorials():
    names = {p.stem for p in TUTORIALS}
    assert {"first_five_minutes", "mpe", "influence", "curvature", "memorization", "representations",
            "own_model_and_data"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(script):
    """Each tutorial script runs (seconds at its tiny size) and its asserts, the claims its page makes, hold."""
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert done.stdout.strip(), f"{script.name} printed nothing"


def test_every_snippet_exists_and_every_tutorial_is_shown():
    """Pages include code only from files and sections that exist, and every tutorial script is on a page
    (so the scripts the tests run are the code the pages show)."""
    shown: set[Path] = set()
    pages = sorted(DOCS.rglob("*.md"))
    assert pages
    for page in pages:
        for ref in SNIPPET.findall(page.read_text()):
            path, _, section = ref.partition(":")
            source = ROOT / path
            assert source.is_file(), f"{page.relative_to(ROOT)} includes {path}, which does not exist"
            if section:
                text = source.read_text()
                assert f"[start:{section}]" in text and f"[end:{section}]" in text, \
                    f"{page.relative_to(ROOT)} includes section {section!r} of {path}, which is not marked there"
            shown.add(source.resolve())
    missing = [p.name for p in TUTORIALS if p.resolve() not in shown]
    assert not missing, f"tutorial scripts on no page: {missing}"


def test_cli_reference_lists_every_command_and_option():
    import typer

    from modelsense.cli import app

    text = _gen_cli().cli_markdown()
    root = typer.main.get_command(app)

    def walk(cmd, path):
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(None):
                yield from walk(cmd.get_command(None, name), [*path, name])
        else:
            yield path, cmd

    commands = list(walk(root, ["modelsense"]))
    assert len(commands) > 10
    for path, cmd in commands:
        assert f"`{' '.join(path)}`" in text, f"{' '.join(path)} is missing from the CLI reference"
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "option" and not param.hidden:
                assert f"`{param.opts[0]}`" in text
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "argument":
                assert f"`{param.metavar or param.name.upper()}" in text
    assert "prior precision δ" in text  # a help text declared on a spec field (TrainConfig.delta)


def _has_mkdocs() -> str | None:
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if importlib.util.find_spec(m.split(".")[0]) is None
               or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)]
    return None if not missing else ", ".join(missing)


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs): a broken link, a missing snippet or a docstring griffe
    cannot read fails it."""
    missing = _has_mkdocs()
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {missing}): `make docs` or "
                    "`pip install -e '.[docs]'` installs it")
    env = {**_env(), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    start = (tmp_path / "site" / "index.html").read_text()
    assert "modelsense" in start
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "modelsense noisy-labels" in cli and "--corruption-ratio" in cli


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recorded_benchmark_becomes_the_measured_numbers_page(tmp_path, monkeypatch):
    """bench/record.py keeps a script's last JSON line with its command, date, machine and load;
    docs/gen_numbers.py turns the kept files into the page's tables; a failing script or one without
    a JSON line records nothing."""
    record = _load(ROOT / "bench" / "record.py", "bench_record")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "fake.py").write_text(
        'import sys, json\nprint("warming up")\n'
        'print(json.dumps({"arm": {"seconds": 1.5, "n": int(sys.argv[1])}, "ratio": 2.0}))\n'
    )
    (bench / "broken.py").write_text('print("no json here")\n')
    (bench / "failing.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(record, "HERE", bench)
    monkeypatch.setattr(record, "RESULTS", bench / "results")
    out = record.record("fake.py", ["7"])
    entry = __import__("json").loads(out.read_text())
    assert entry["command"] == "python bench/fake.py 7" and entry["figures"]["arm"]["n"] == 7
    assert entry["machine"]["cpu_count"] == os.cpu_count() and len(entry["load_before"]) == 3
    for bad in ("broken.py", "failing.py", "missing.py"):
        with pytest.raises(SystemExit):
            record.record(bad, [])
    assert [p.name for p in (bench / "results").iterdir()] == ["fake.json"]
    page = _load(DOCS / "gen_numbers.py", "docs_gen_numbers").numbers_markdown(bench / "results")
    assert "`python bench/fake.py 7`" in page and "| arm.seconds | 1.5 |" in page and "| ratio | 2 |" in page
    empty = tmp_path / "none"
    empty.mkdir()
    assert "No benchmark has been recorded" in _load(DOCS / "gen_numbers.py", "g2").numbers_markdown(empty)
