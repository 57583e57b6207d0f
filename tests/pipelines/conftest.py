"""Fixtures shared by the pipeline tests."""

import pytest


@pytest.fixture
def restore_attention_backend():
    """set_attention_backend also sets diffusers' process-wide default: keep tests independent."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)
