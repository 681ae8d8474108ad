"""Fixtures for the deployment tests: tools from .tools/ and the rendered kustomize overlays.

`scripts/install-deploy-tools.sh` installs the tools into .tools/ (CI runs it first); a test
that needs a tool skips, naming that script, only when the tool is missing.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("cpu", "gpu")
TOOL_DIRS = (ROOT / ".tools" / "bin", ROOT / ".tools" / "venv" / "bin")


def _find_tool(name: str) -> str | None:
    for folder in TOOL_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


def _require_tool(name: str) -> str:
    path = _find_tool(name)
    if path is None:
        pytest.skip(f"{name} not in .tools/ nor on PATH: run scripts/install-deploy-tools.sh")
    return path


@functools.cache
def _kustomize_build(kustomize: str, overlay: str) -> str:
    result = subprocess.run(
        [kustomize, "build", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"kustomize build {overlay} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture
def kustomize() -> str:
    return _require_tool("kustomize")


@pytest.fixture
def checkov() -> str:
    return _require_tool("checkov")


@pytest.fixture
def hadolint() -> str:
    return _require_tool("hadolint")


@pytest.fixture
def render(kustomize: str):
    """Return a function: overlay name -> rendered YAML text (built once per session)."""
    return functools.partial(_kustomize_build, kustomize)


@pytest.fixture
def objects_of(render) -> Any:
    """Return a function: overlay name -> list of rendered objects."""
    return lambda overlay: [doc for doc in yaml.safe_load_all(render(overlay)) if doc]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def objects(objects_of, overlay: str) -> list[dict[str, Any]]:
    return objects_of(overlay)
