"""One logging setup for every service process."""
from __future__ import annotations

import logging
import os


def setup_logging(service: str) -> logging.Logger:
    level = os.environ.get("RLGRID_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return logging.getLogger(service)
