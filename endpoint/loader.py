"""Imports the handler named `module:attr` the way the worker image would run it."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

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
    progress.install()  # before the import, so `from runpod.serverless import progress_update` binds ours
    module = importlib.import_module(module_name)
    handler = getattr(module, attr)
    if not callable(handler):
        raise TypeError(f"{spec} is not callable")
    if progress.is_bound_to_sdk(vars(module)):
        log.warning("%s was imported before the progress hook: its progress will not reach /status", module_name)
    modifier = getattr(module, "concurrency_modifier", None)
    return LoadedHandler(handler=handler, concurrency_modifier=modifier if callable(modifier) else None, spec=spec)
