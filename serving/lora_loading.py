"""A job's `loras` → adapters for its images: each file resolved (LORA_DIR or a bounded https
download, serving/lora_source.py), parsed and checked against the model (pipelines/lora.py), kept
in the adapter cache. Runs on its own small pool: a slow LoRA host holds only its job.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipelines.lora import FORMATS, LoraAdapter, LoraCache, LoraError, MixedLoraLayers, load_lora
from serving.errors import JobError
from serving.lora_source import LoraSource, LoraSourceConfig
from serving.schema import MAX_LORA_SCALE, MAX_LORAS, LoraRef
from serving.settings import Settings

LORA_THREADS = 2


class LoraLoader:
    """LoRA files → validated adapters, with a disk cache of downloads and an adapter cache."""

    def __init__(self, settings: Settings, layers: MixedLoraLayers) -> None:
        self.settings = settings
        self.layers = layers
        self.source = LoraSource(LoraSourceConfig(
            lora_dir=settings.lora_dir, allow_urls=settings.lora_allow_urls, max_bytes=settings.lora_max_mb * 2**20,
            fetch_timeout_s=settings.lora_fetch_timeout_s, cache_dir=settings.lora_cache_dir,
            cache_max_bytes=settings.lora_cache_mb * 2**20,
        ))
        self.adapters = LoraCache(settings.lora_adapter_cache)
        self._pool = ThreadPoolExecutor(LORA_THREADS, thread_name_prefix="lora")

    def _load(self, index: int, ref: LoraRef) -> tuple[LoraAdapter, dict[str, Any]]:
        try:
            file = self.source.resolve(ref.path)
            adapter, adapter_hit = self.adapters.get_or_load(
                file.sha256, lambda: load_lora(file.read(), self.layers, sha256=file.sha256))
        except LoraError as err:
            raise JobError("invalid_lora", err.rule, field=f"loras[{index}]") from None
        report = {"index": index, "sha256": adapter.sha256, "scale": ref.scale, "format": adapter.source_format,
                  "download_cache_hit": file.cache_hit, "adapter_cache_hit": adapter_hit}
        return adapter, report

    async def load(self, refs: list[LoraRef]) -> tuple[tuple[tuple[LoraAdapter, float], ...], list[dict[str, Any]]]:
        """Every image of the job gets these (adapter, scale) pairs; the reports say what each LoRA
        was and whether it came from a cache. The first LoRA that fails names itself: `loras[i]`."""
        loop = asyncio.get_running_loop()
        loaded = await asyncio.gather(*(loop.run_in_executor(self._pool, self._load, i, ref)
                                        for i, ref in enumerate(refs)))
        return tuple((adapter, ref.scale) for (adapter, _), ref in zip(loaded, refs)), [r for _, r in loaded]

    def describe(self) -> dict[str, Any]:
        """Capabilities' `loras`."""
        settings = self.settings
        return {"available": True, "max_count": MAX_LORAS, "scale": [-MAX_LORA_SCALE, MAX_LORA_SCALE],
                "formats": list(FORMATS),
                "lora_dir": settings.lora_dir is not None, "urls": settings.lora_allow_urls,
                "max_mb": settings.lora_max_mb,
                "disk_cache_mb": settings.lora_cache_mb if settings.lora_cache_dir else 0,
                "adapter_cache": settings.lora_adapter_cache, "mixed_batches": True, "modes": ["fast"]}
