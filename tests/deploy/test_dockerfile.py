"""The Dockerfile lints clean, builds both variants from one file, and runs as the app user.

No Docker engine here: the image itself is built elsewhere. These tests read the file, lint
it with hadolint, check the build context (.dockerignore) and run the health-check script.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import socket
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"

Instruction = tuple[str, str]  # (KEYWORD, arguments), continuation lines joined


def instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        keyword, _, args = logical.partition(" ")
        out.append((keyword.upper(), args.strip()))
        logical = ""
    return out


def stages(text: str) -> dict[str, list[Instruction]]:
    """Return the instructions of each build stage by its name (FROM ... AS name)."""
    out: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for keyword, args in instructions(text):
        if keyword == "FROM":
            name = re.search(r"\s+AS\s+(\S+)$", args, re.IGNORECASE)
            assert name, f"unnamed stage: FROM {args}"
            current = out.setdefault(name.group(1), [])
        if current is not None:
            current.append((keyword, args))
    return out


def from_image(stage: list[Instruction]) -> str:
    return re.split(r"\s+", stage[0][1])[0]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_hadolint_passes(hadolint: str) -> None:
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_give_a_reason(dockerfile: str) -> None:
    lines = dockerfile.splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.partition("=")[2].split(",")
            context = " ".join(lines[max(0, i - 3):i])
            assert all(f"{rule}:" in context for rule in rules), f"no reason for line {i + 1}"


def test_variant_build_arg_picks_the_base(dockerfile: str) -> None:
    first = instructions(dockerfile)[0]
    assert first == ("ARG", "VARIANT=cpu")
    by_stage = stages(dockerfile)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?",
                        from_image(by_stage["base-cpu"]))
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn\d*-runtime-ubuntu22\.04"
                        r"(@sha256:[0-9a-f]{64})?", from_image(by_stage["base-gpu"]))
    assert from_image(by_stage["builder"]) == "base-${VARIANT}"
    assert from_image(by_stage["runtime"]) == "base-${VARIANT}"
    assert list(by_stage)[-1] == "runtime", "the last stage is the default build target"


def test_builder_installs_the_right_extras(dockerfile: str) -> None:
    run = " ".join(args for kw, args in stages(dockerfile)["builder"] if kw == "RUN")
    gpu, _, cpu = run.partition("else")
    assert 'pip install ".[gpu,trainer]"' in gpu
    assert "onnxruntime-gpu==" in gpu
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu
    assert 'pip install ".[serving,trainer]"' in cpu
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {"serving", "gpu", "trainer"} <= set(extras)


def test_runtime_stage_is_small_and_unprivileged(dockerfile: str) -> None:
    runtime = stages(dockerfile)["runtime"]
    copies = [args for kw, args in runtime if kw == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv",
                      "deploy/docker/healthcheck.py /opt/advrec/healthcheck.py"]
    users = [args for kw, args in runtime if kw == "USER"]
    assert users == ["10001:10001"]
    assert re.search(r"useradd .*--uid 10001", " ".join(a for k, a in runtime if k == "RUN"))
    last = {kw: args for kw, args in runtime}
    assert json.loads(last["ENTRYPOINT"]) == ["advrec"]
    assert json.loads(last["CMD"]) == ["worker"]
    assert "healthcheck.py" in last["HEALTHCHECK"] and "curl" not in last["HEALTHCHECK"]
    assert set(last["EXPOSE"].split()) == {"6066", "9108"}


# -- build context ----------------------------------------------------------------------------

def _glob_regex(glob: str) -> str:
    """Translate a .dockerignore glob (Go filepath.Match plus `**`) to a regex."""
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        elif glob[i] == "[":
            end = glob.index("]", i)
            out, i = out + glob[i:end + 1], end + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return out


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        regex = _glob_regex(pattern.removeprefix("!").strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".git/HEAD", ".venv/bin/python", ".tools/bin/kustomize", "kafka/lib/x.jar",
                 "var/data/x", "tests/unit/test_x.py", "bench/results/run.json",
                 "k8s/base/deployment.yaml", "advrec/__pycache__/x.cpython-311.pyc",
                 "advrec.egg-info/PKG-INFO", ".env"):
        assert _dockerignored(path, patterns), f"{path} would be sent to the builder"
    for path in ("pyproject.toml", "README.md", "advrec/config.py", "stream_app/app.py",
                 "trainer/loop.py", "deploy/docker/healthcheck.py"):
        assert not _dockerignored(path, patterns), f"{path} missing from the build context"


def test_copied_sources_exist(dockerfile: str) -> None:
    for kw, args in instructions(dockerfile):
        if kw == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"


# -- health check -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("advrec_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class FakeServer:
    port: int
    status: dict[str, int]  # path -> HTTP status; other paths get 404


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer(port=0, status={"/healthz": 200, "/metrics": 200})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(fake.status.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield fake
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _cmdline(tmp_path: Path, *argv: str) -> str:
    path = tmp_path / "cmdline"
    path.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return str(path)


def test_healthcheck_probes_the_worker_healthz(
        healthcheck: ModuleType, server: FakeServer, tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "/opt/venv/bin/python", "/opt/venv/bin/advrec", "worker")
    env = {"ADVREC_WEB_PORT": str(server.port)}
    assert healthcheck.command(cmdline) == "worker"
    assert healthcheck.main(cmdline, env) == 0
    server.status["/healthz"] = 503
    assert healthcheck.main(cmdline, env) == 1


def test_healthcheck_probes_the_trainer_metrics(
        healthcheck: ModuleType, server: FakeServer, tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "/opt/venv/bin/python", "/opt/venv/bin/advrec", "trainer")
    env = {"ADVREC_TRAINER_METRICS_PORT": str(server.port), "ADVREC_WEB_PORT": "1"}
    assert healthcheck.main(cmdline, env) == 0


def test_healthcheck_fails_when_nothing_listens(
        healthcheck: ModuleType, tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "python", "advrec", "worker")
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert healthcheck.main(cmdline, {"ADVREC_WEB_PORT": str(port)}) == 1


def test_healthcheck_passes_for_one_shot_commands(
        healthcheck: ModuleType, tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "python", "advrec", "replay", "synthetic", "--rate", "200")
    assert healthcheck.command(cmdline) == "replay"
    assert healthcheck.main(cmdline, {}) == 0
    assert healthcheck.command(str(tmp_path / "missing")) == "worker"
