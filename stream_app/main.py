"""``advrec worker``: run one stream worker (ingest, batcher, web API, model serving)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading

from advrec.config import ConfigError, settings_as_dict
from advrec.topics import default_topics, ensure_topics
from stream_app.settings import Settings, load_settings

__all__ = ["main"]

log = logging.getLogger("advrec.worker")

SHUTDOWN_GRACE_S = 25.0  # a worker whose agent crash-loops may ignore SIGTERM; then exit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="advrec worker",
        description="Run a stream worker: consume `clicks`, keep user state in RocksDB tables, "
                    "send bad events to the dead-letter topic, publish training batches, and "
                    "serve recommendations over HTTP from the current ONNX bundle. Every flag "
                    "can also be given as an environment variable (shown in brackets).",
        )
    defaults = Settings()
    p.add_argument("--broker", help=f"Kafka URL(s) [ADVREC_BROKER] (default {defaults.broker})")
    p.add_argument("--web-port", type=int,
                   help=f"HTTP port [ADVREC_WEB_PORT] (default {defaults.web_port})")
    p.add_argument("--web-bind", help="address to listen on [ADVREC_WEB_BIND] "
                                      f"(default {defaults.web_bind})")
    p.add_argument("--web-host", help="host advertised to other workers [ADVREC_WEB_HOST]")
    p.add_argument("--data-dir",
                   help=f"table storage [ADVREC_DATA_DIR] (default {defaults.data_dir})")
    p.add_argument("--bundle-dir",
                   help=f"model bundles [ADVREC_BUNDLE_DIR] (default {defaults.bundle_dir})")
    p.add_argument("--partitions", type=int,
                   help="partitions of `clicks` [ADVREC_PARTITIONS] "
                        f"(default {defaults.partitions})")
    p.add_argument("--log-level", help="debug, info, warning [ADVREC_LOG_LEVEL] (default info)")
    p.add_argument("--no-create-topics", action="store_true",
                   help="do not create missing source topics at start-up")
    return p


def _arm_shutdown_watchdog() -> None:
    def expire() -> None:
        log.error("shutdown took longer than %.0f s; exiting hard", SHUTDOWN_GRACE_S)
        os._exit(1)

    timer = threading.Timer(SHUTDOWN_GRACE_S, expire)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(broker=args.broker, web_port=args.web_port,
                                 web_bind=args.web_bind, web_host=args.web_host,
                                 data_dir=args.data_dir, bundle_dir=args.bundle_dir,
                                 partitions=args.partitions, log_level=args.log_level)
    except ConfigError as exc:
        print(f"advrec worker: {exc}", file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    log.info("settings: %s", settings_as_dict(settings))
    if not args.no_create_topics:
        asyncio.run(ensure_topics(settings.bootstrap, default_topics(
            clicks=settings.topic_clicks, dlq=settings.topic_dlq, train=settings.topic_train,
            bundles=settings.topic_bundles, flags=settings.topic_flags,
            items=settings.topic_items, items_dlq=settings.topic_items_dlq,
            partitions=settings.partitions, replication=settings.replication,
            app_id=settings.app_id)))

    import faust  # imported late: `advrec worker --help` should not pay for it

    from stream_app.app import create_app

    sa = create_app(settings)

    @sa.app.on_before_shutdown.connect
    async def _bounded(app: object, **kwargs: object) -> None:
        _arm_shutdown_watchdog()

    worker = faust.Worker(sa.app, loglevel=level, quiet=True, redirect_stdouts=False)
    # Faust's terminal spinner, at a log level of WARNING or above, sets the root logger to
    # DEBUG so that every record spins it: every debug call of Faust and aiokafka then builds
    # a LogRecord (5.6 % of the event loop under load, py-spy) and escape codes reach the log
    worker.spinner = None
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
