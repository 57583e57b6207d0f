"""`python -m endpoint.sdk_worker module:attr`: a handler other than handler.py's under the runpod
SDK's own worker loop, started by the local endpoint the way `python handler.py` is.

The config is the project's handler contract: the handler, `return_aggregate_stream=True`, and the
module's `concurrency_modifier` if it has one. The SDK reads the RUNPOD_WEBHOOK_* environment the
worker pool sets (endpoint/pool.py).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")  # before the SDK's import: DEBUG logs whole outputs

import runpod.serverless  # noqa: E402


def main(argv: list[str]) -> None:
    if len(argv) != 1 or ":" not in argv[0]:
        raise SystemExit("usage: python -m endpoint.sdk_worker module:attr")
    module_name, _, attr = argv[0].partition(":")
    module = importlib.import_module(module_name)
    config = {"handler": getattr(module, attr), "return_aggregate_stream": True}
    modifier = getattr(module, "concurrency_modifier", None)
    if callable(modifier):
        config["concurrency_modifier"] = modifier
    sys.argv = sys.argv[:1]  # the SDK parses the process's arguments as its own
    runpod.serverless.start(config)


if __name__ == "__main__":
    main(sys.argv[1:])
