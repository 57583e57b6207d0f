"""Runs the local endpoint in the foreground: `scripts/serve_local.py` and
`python handler.py --rp_serve_api` both come here."""

from __future__ import annotations

import dataclasses
import logging
import os
from types import ModuleType

from aiohttp import web

from endpoint.app import ServerSettings, create_app
from endpoint.loader import LoadedHandler, from_module, quiet_sdk_logs
from endpoint.webhook import WebhookPolicy

API_KEY_ENV = "LOCAL_ENDPOINT_API_KEY"

log = logging.getLogger(__name__)


def dev_settings(api_key: str | None = None, **overrides: object) -> ServerSettings:
    """A developer's server: webhooks may call this machine (a receiver on loopback), which
    RunPod never does; pass `webhook=WebhookPolicy()` for public targets only."""
    settings = ServerSettings(api_key=api_key, webhook=WebhookPolicy(allow_private=True))
    return dataclasses.replace(settings, **overrides)


def serve(loaded: LoadedHandler, host: str, port: int, settings: ServerSettings) -> None:
    """Serve until interrupted."""
    log.info("serving %s at http://%s:%d/v2/<endpoint_id>/ (auth %s, private webhooks %s)",
             loaded.spec, host, port, "on" if settings.api_key else "off",
             "allowed" if settings.webhook.allow_private else "refused")
    web.run_app(create_app(loaded, settings), host=host, port=port, print=None)


def serve_module(module: ModuleType, host: str, port: int) -> None:
    """`python handler.py --rp_serve_api`: this module's handler, with the dev settings and
    `$LOCAL_ENDPOINT_API_KEY` as the key if set."""
    quiet_sdk_logs()
    serve(from_module(module), host, port, dev_settings(os.environ.get(API_KEY_ENV) or None))
