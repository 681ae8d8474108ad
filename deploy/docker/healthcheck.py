"""Container health check: probe the HTTP endpoint of the `advrec` command that is PID 1.

Standard library only, so the image needs no curl. Exits 0 when healthy, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping

__all__ = ["command", "main", "probe_url"]

COMMANDS = ("worker", "trainer", "replay", "export", "evaluate")
TIMEOUT_S = 4.0  # below the Dockerfile's HEALTHCHECK --timeout of 5 s


def command(cmdline_path: str = "/proc/1/cmdline") -> str:
    """Return the advrec sub-command in ``cmdline_path`` (`worker` when it cannot be told)."""
    try:
        with open(cmdline_path, "rb") as fh:
            argv = [arg.decode(errors="replace") for arg in fh.read().split(b"\0") if arg]
    except OSError:
        return "worker"
    return next((arg for arg in argv[1:] if arg in COMMANDS), "worker")


def probe_url(cmd: str, environ: Mapping[str, str]) -> str | None:
    """Return the URL that tells whether ``cmd`` is healthy, or None when it serves none."""
    if cmd == "worker":
        return f"http://127.0.0.1:{environ.get('ADVREC_WEB_PORT', '6066')}/healthz"
    if cmd == "trainer":
        return f"http://127.0.0.1:{environ.get('ADVREC_TRAINER_METRICS_PORT', '9108')}/metrics"
    return None


def main(cmdline_path: str = "/proc/1/cmdline", environ: Mapping[str, str] = os.environ) -> int:
    """Probe the endpoint of the command PID 1 runs; return the exit status."""
    url = probe_url(command(cmdline_path), environ)
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError and HTTPError (non-2xx) are OSErrors
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
