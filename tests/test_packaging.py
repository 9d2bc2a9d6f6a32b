"""Packaging: the installed distribution's metadata agrees with the source tree (version, console entry
points, dependencies that are used), the top-level setup.py defers to pyproject.toml with one source of
the version, and docs/math.md has a heading for every section it is cited by.

The metadata checks read what `pip install -e .` recorded (importlib.metadata); in an environment where
the package is not installed they are skipped, not failed.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import crawler
import kernels

DIST = "crawler-kernels"
ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "crawler-quantize": "crawler.quantize:main",
    "crawler-evaluate": "crawler.evaluate:main",
    "crawler-generate": "crawler.generate:main",
}
# Where the runtime dependencies must be used: the installed packages and the scripts shipped beside them.
RUNTIME_SOURCES = ("kernels", "crawler", "bench", "train.py")


@pytest.fixture(scope="module")
def dist() -> md.Distribution:
    try:
        return md.distribution(DIST)
    except md.PackageNotFoundError:
        pytest.skip(f"{DIST} is not installed in this environment (pip install -e .)")


def _normalise(name: str) -> str:
    """A distribution name in its canonical form (PEP 503: case and -_. runs do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: md.Distribution) -> tuple[set[str], dict[str, set[str]]]:
    """(runtime requirement names, {extra: requirement names}) from the installed metadata."""
    runtime, extras = set(), {}
    for req in dist.requires or []:
        name = _normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))
        extra = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", req)
        if extra:
            extras.setdefault(extra.group(1), set()).add(name)
        else:
            runtime.add(name)
    return runtime, extras


def _imported_distributions(sources) -> set[str]:
    """Distributions (canonical names) that provide a top-level module imported by any .py file under
    `sources` (paths relative to the repository root). Standard-library and local modules map to none."""
    files = []
    for source in sources:
        path = ROOT / source
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    modules = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    providers = md.packages_distributions()
    return {_normalise(d) for m in modules - set(sys.stdlib_module_names) for d in providers.get(m, ())}


def test_version_is_single_sourced_and_installed(dist):
    assert re.fullmatch(r"\d+\.\d+\.\d+", kernels.__version__), kernels.__version__
    assert crawler.__version__ == kernels.__version__
    assert dist.version == kernels.__version__, (
        f"installed metadata says {dist.version} but kernels.__version__ is {kernels.__version__}: "
        f"reinstall (make clean venv, or pip install -e .)")


def test_console_entry_points_resolve_to_the_cli_mains(dist):
    scripts = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
    assert {name: ep.value for name, ep in scripts.items()} == ENTRY_POINTS
    for name, ep in scripts.items():
        main = ep.load()
        assert callable(main), name
        # Each main parses its own argv: --help prints usage and exits with status 0.
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0, name


def test_every_runtime_dependency_is_imported(dist):
    runtime, _ = _requirements(dist)
    unused = sorted(runtime - _imported_distributions(RUNTIME_SOURCES))
    assert not unused, (f"declared in pyproject.toml but imported nowhere in {', '.join(RUNTIME_SOURCES)}: "
                        f"{unused}; use them or remove them")


def test_every_imported_distribution_is_declared(dist):
    runtime, extras = _requirements(dist)
    own = {_normalise(DIST)}
    undeclared = sorted(_imported_distributions(("kernels", "crawler", "train.py")) - runtime - own)
    assert not undeclared, f"imported by the package but not a runtime dependency: {undeclared}"
    undeclared = sorted(_imported_distributions(("bench",)) - runtime - extras.get("bench", set()) - own)
    assert not undeclared, f"imported by bench/ but neither a runtime nor a `bench` dependency: {undeclared}"


# setuptools reads the SPDX `license` string of pyproject.toml from version 77 on (its build-system pin).
SETUPTOOLS_MIN = (77,)
VERSION_SOURCE = "kernels/__init__.py"


def test_setup_py_only_hands_over_to_pyproject():
    """setup.py calls setup() with no argument: all metadata stays in pyproject.toml, which reads the
    version from kernels/__init__.py (statically: building never imports torch)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert [ast.unparse(call) for call in calls] == ["setup()"], "setup.py must call setup() and nothing else"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kernels.__version__"}


def test_version_literal_lives_in_one_file():
    """The version string is written in kernels/__init__.py and in no other source or metadata file."""
    holders = sorted(path for path, text in _repository_texts()
                     if not path.endswith(".md") and kernels.__version__ in text)
    assert holders == [VERSION_SOURCE], f"the version {kernels.__version__} is written in {holders}"


def test_setup_py_version_is_the_package_version():
    """`python setup.py --version` (the design card's entry point) prints kernels.__version__."""
    setuptools = pytest.importorskip("setuptools", reason="`python setup.py` needs setuptools installed")
    if tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:1]) < SETUPTOOLS_MIN:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject.toml's build requirement "
                    f"(>= {SETUPTOOLS_MIN[0]})")
    done = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [kernels.__version__], done.stdout


def _math_headings() -> set[str]:
    text = (ROOT / "docs" / "math.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", text, flags=re.MULTILINE))


def _section_refs(text: str) -> set[str]:
    """Section numbers in `text`'s "§x.y" references; a range "§7.1-7.2" gives both ends."""
    return {ref for pair in re.findall(r"§(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?", text) for ref in pair if ref}


def _repository_texts():
    """(relative path, text) of every .py, .md and .toml file of the repository, outside .venv and the like."""
    skip = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".cache", "runs"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith((".py", ".md", ".toml")):
                path = Path(dirpath, name)
                yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def test_every_math_citation_has_a_heading():
    """Each `docs/math.md §x.y` cited in the repository (lists such as "§1.5, §1.6" and ranges such as
    "§7.1-7.2" included), and each `§x.y` cross-reference inside docs/math.md, names one of its headings."""
    headings = _math_headings()
    assert {"1.1", "1.12", "2", "7.1", "7.4", "8"} <= headings
    missing = {}
    for path, text in _repository_texts():
        if path == "docs/math.md":
            refs = _section_refs(text)
            assert refs, "docs/math.md cross-references its own sections"
        else:
            citations = re.findall(r"docs/math\.md (?:§[\d.]+(?:-[\d.]+)?(?:, )?)+", text)
            refs = set().union(*map(_section_refs, citations))
        if refs - headings:
            missing[path] = sorted(refs - headings)
    assert not missing, f"citations of docs/math.md sections that have no heading: {missing}"
