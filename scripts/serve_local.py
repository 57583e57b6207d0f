#!/usr/bin/env python
"""Serve a handler behind the RunPod endpoint HTTP API on this machine (see docs/ENDPOINT.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: handler.py, endpoint/

from aiohttp import web  # noqa: E402

from endpoint.app import ServerSettings, create_app  # noqa: E402
from endpoint.loader import DEFAULT_HANDLER, load_handler  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-key", default=os.environ.get("LOCAL_ENDPOINT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LOCAL_ENDPOINT_API_KEY, else none)")
    parser.add_argument("--handler", default=DEFAULT_HANDLER, help="module:attr (default %(default)s)")
    parser.add_argument("--execution-timeout", type=float, default=ServerSettings.execution_timeout_s,
                        help="seconds per job unless policy.executionTimeout says otherwise")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_handler(args.handler)
    settings = ServerSettings(api_key=args.api_key, execution_timeout_s=args.execution_timeout)
    logging.getLogger("serve_local").info(
        "serving %s at http://%s:%d/v2/<endpoint_id>/ (auth %s)",
        loaded.spec, args.host, args.port, "on" if args.api_key else "off",
    )
    web.run_app(create_app(loaded, settings), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
