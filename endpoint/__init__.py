"""A local server speaking the RunPod endpoint HTTP API over the worker's own handler.

The runpod SDK's local server cannot be benchmarked (no execution on /run, no live /stream,
no /health or /cancel); this one runs jobs with the SDK worker's semantics instead.
"""
