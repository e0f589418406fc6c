"""A named logger per stage with -v/-q."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager


def add_verbosity_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def setup_logging(args: argparse.Namespace | None = None) -> None:
    level = logging.INFO
    if args is not None and getattr(args, "verbose", False):
        level = logging.DEBUG
    elif args is not None and getattr(args, "quiet", False):
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    # Third-party chatter drowns the stage's own lines.
    for noisy in ("transformers", "optimum", "onnxruntime", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    import warnings

    # the exporter's tracer warnings are about control flow optimum handles; they bury the checklist
    warnings.filterwarnings("ignore", message=".*[Tt]race.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # importing transformers here would cost seconds in every CLI start; the variable covers a later import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


@contextmanager
def timed(log: logging.Logger, what: str, timings: dict | None = None, key: str | None = None):
    """Log how long an expensive step took; optionally store it in `timings[key]` (seconds)."""
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    log.info("%s took %.2f s", what, dt)
    if timings is not None:
        timings[key or what] = round(dt, 4)
