"""A Python interpreter for which this package does not exist, to run bundles the way a user's machine
would: a virtual environment that sees this interpreter's third-party packages (torch, triton, ...) but
not the editable install of crawler-kernels (a `.pth` line adds the site-packages directories as plain
paths, so their own `.pth` hooks, the editable finder among them, never run). Run it with clean_env()
and a working directory outside the checkout."""
from __future__ import annotations

import os
import site
import subprocess
import venv
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def isolated_python(tmp_path_factory) -> Path:
    """The `python` of that environment; checked to find neither `crawler` nor `kernels`."""
    root = tmp_path_factory.mktemp("isolated_venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    site_packages = next(root.glob("lib/python*/site-packages"))
    paths = [*site.getsitepackages(), site.getusersitepackages()]
    (site_packages / "parent_site_packages.pth").write_text("".join(f"{p}\n" for p in paths if os.path.isdir(p)))
    python = root / "bin" / "python"
    probe = "import importlib.util as u; print(u.find_spec('crawler') is None and u.find_spec('kernels') is None)"
    out = subprocess.run([str(python), "-c", probe], cwd=root, env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "True", f"the isolated interpreter can import this package: {out}"
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the PYTHON* variables (PYTHONPATH could reach the checkout), plus
    `extra`. The rest is kept: OPENBLAS_* settings, say, change which kernel numpy's matmul (the Triton
    interpreter's tl.dot) runs, and with it the last bits of a result."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, **extra}
