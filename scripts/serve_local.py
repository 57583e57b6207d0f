#!/usr/bin/env python
"""Serve a handler behind the RunPod endpoint HTTP API on this machine (see docs/ENDPOINT.md)."""

from __future__ import annotations

import argparse
import logging
import os


from endpoint.app import ServerSettings
from endpoint.loader import DEFAULT_HANDLER, load_handler
from endpoint.server import API_KEY_ENV, dev_settings, serve
from endpoint.webhook import WebhookPolicy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--handler", default=DEFAULT_HANDLER, help="module:attr (default %(default)s)")
    parser.add_argument("--execution-timeout", type=float, default=ServerSettings.execution_timeout_s,
                        help="seconds per job unless policy.executionTimeout says otherwise")
    parser.add_argument("--public-webhooks-only", action="store_true",
                        help="refuse webhooks to private, loopback and link-local addresses, as RunPod does")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    public_only = {"webhook": WebhookPolicy()} if args.public_webhooks_only else {}
    settings = dev_settings(args.api_key, execution_timeout_s=args.execution_timeout, **public_only)
    serve(load_handler(args.handler), args.host, args.port, settings)


if __name__ == "__main__":
    main()
