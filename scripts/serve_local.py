#!/usr/bin/env python
"""Serve a handler behind the RunPod endpoint HTTP API on this machine: a job server speaking
RunPod's worker protocol, with worker processes running the handler under the runpod SDK's own
loop (see docs/ENDPOINT.md)."""

from __future__ import annotations

import argparse
import logging

from endpoint.app import ServerSettings
from endpoint.pool import DEFAULT_HANDLER, PoolSettings, worker_command
from endpoint.server import API_KEY_ENV, api_key_from_env, dev_settings, serve
from endpoint.webhook import WebhookPolicy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-key", default=api_key_from_env(),
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--handler", default=DEFAULT_HANDLER,
                        help="module:attr the workers serve (default %(default)s: `python handler.py`)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the queue (default 1)")
    parser.add_argument("--execution-timeout", type=float, default=ServerSettings.execution_timeout_s,
                        help="seconds per job unless policy.executionTimeout says otherwise")
    parser.add_argument("--public-webhooks-only", action="store_true",
                        help="refuse webhooks to private, loopback and link-local addresses, as RunPod does")
    args = parser.parse_args(argv)
    if not 0 <= args.workers <= 64:
        parser.error("--workers must be 0..64")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    public_only = {"webhook": WebhookPolicy()} if args.public_webhooks_only else {}
    settings = dev_settings(args.api_key, execution_timeout_s=args.execution_timeout, **public_only)
    try:
        command = worker_command(args.handler)
    except ValueError as err:
        parser.error(str(err))
    serve(settings, PoolSettings(command=command, workers=args.workers), args.host, args.port)


if __name__ == "__main__":
    main()
