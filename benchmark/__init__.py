"""Endpoint benchmark harness: measures image generation as the users' app sees it (HTTP API)."""
