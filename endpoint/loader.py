"""Imports the handler named `module:attr` the way the worker image would run it."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from collections.abc import Callable

from runpod.serverless.modules.rp_logger import LOG_LEVELS, RunPodLogger

from endpoint import progress
from endpoint.runner import ConcurrencyModifier

log = logging.getLogger(__name__)

DEFAULT_HANDLER = "handler:handler"


@dataclass(frozen=True)
class LoadedHandler:
    handler: Callable[..., Any]
    concurrency_modifier: ConcurrencyModifier | None
    spec: str


def quiet_sdk_logs() -> None:
    """The SDK logs every handler output at DEBUG (base64 images): never go below INFO."""
    logger = RunPodLogger()
    if LOG_LEVELS.index(logger.level) < LOG_LEVELS.index("INFO"):
        logger.set_level("INFO")


def load_handler(spec: str = DEFAULT_HANDLER) -> LoadedHandler:
    """Import `module:attr`; the module's `concurrency_modifier`, if any, sets the job concurrency."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"handler must look like module:attr, got {spec!r}")
    quiet_sdk_logs()
    return from_module(importlib.import_module(module_name), attr)


def from_module(module: ModuleType, attr: str = "handler") -> LoadedHandler:
    """Serve `module.attr` (an already imported module: `python handler.py --rp_serve_api` is
    `__main__`, and importing it again would load the model twice). A module-level
    `concurrency_modifier` sets the job concurrency; `set_progress_sink(sink)`, if defined, is
    given the server's progress router (endpoint/progress.py)."""
    spec = f"{module.__name__}:{attr}"
    handler = getattr(module, attr)
    if not callable(handler):
        raise TypeError(f"{spec} is not callable")
    set_sink = getattr(module, "set_progress_sink", None)
    if callable(set_sink):
        set_sink(progress.route)
    else:
        log.info("%s has no set_progress_sink: its progress will not reach /status", module.__name__)
    modifier = getattr(module, "concurrency_modifier", None)
    return LoadedHandler(handler=handler, concurrency_modifier=modifier if callable(modifier) else None, spec=spec)
