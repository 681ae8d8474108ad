"""The ``advrec`` command: one entry point, a subcommand per process or tool."""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

# name -> (module with main(argv) -> int, one-line help). Imported lazily so that the stream
# image never imports torch and `advrec --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "worker": ("stream_app.main", "run a stream worker: ingest, user state, HTTP API, serving"),
    "trainer": ("trainer.sidecar", "run the sidecar trainer: consume batches, train, export"),
    "replay": ("advrec.replay", "produce a synthetic or recorded click stream into Kafka"),
    "attack": ("trainer.attack_model", "replay a stream with fake users (a shilling attack)"),
    "export": ("trainer.export", "turn a trainer checkpoint into a model bundle"),
    "evaluate": ("trainer.evaluate", "prequential / offline evaluation on a dataset (no Kafka)"),
    "topics": ("advrec.topics_cli", "create the source topics with the configured partitions"),
}

USAGE = """usage: advrec <command> [options]

advrec: a streaming recommendation service that learns online with adversarial training.

commands:
{commands}

Run `advrec <command> --help` for the options of one command. Settings can also be given
as ADVREC_* environment variables (see README.md, "Configuration").
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items())
        print(USAGE.format(commands=lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from advrec import __version__

        print(f"advrec {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"advrec: unknown command {name!r}; try `advrec --help`", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
