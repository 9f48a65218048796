"""``python -m tests.integration.crashing_run CONFIG POINT``: ``dicom-gateway run`` that SIGKILLs
itself when the inbox reaches ``POINT`` (``inbox.CHECKPOINTS``); the crash tests prove with it
that a job yields exactly one object whatever moment the process dies at. The hook is passed
to ``service.run`` as a callable, never read from the environment."""

from __future__ import annotations

import logging
import os
import signal
import sys

from gateway import cli, service
from gateway.config import load


def main(config_path: str, point: str) -> int:
    config = load(config_path)
    cli.setup_logging(config.logging.level)

    def crash(name: str) -> None:
        if name == point:
            logging.getLogger("gateway.inbox").warning("crash hook at %s: killing the process", point)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return service.run(config, crash_hook=crash)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
