"""diffusers' `FluxPipeline`, imported so that an install without torchvision reads as the sound one it is.

diffusers' Flux pipeline module imports transformers' `CLIPImageProcessor` and `SiglipImageProcessor` (for
IP-Adapter, which we never load). Since transformers 5 those names mean the torchvision-backed classes; with
no torchvision (none is built for our torch, on CPU or in the image) transformers falls back to the PIL
classes and logs "requires torchvision (not installed)" for each, at every start: it reads like a broken
install. Binding the two names to the PIL classes before that import is the same fallback, chosen here once.
Import `FluxPipeline` (and its module's `calculate_shift`) from this module, never from diffusers directly.
"""

from __future__ import annotations

import importlib

from transformers.utils import is_torchvision_available

PIL_FALLBACKS = ("CLIPImageProcessor", "SiglipImageProcessor")



def bind_pil_image_processors() -> None:
    """Without torchvision, transformers' legacy processor names mean their PIL classes, silently."""
    if is_torchvision_available():
        return
    pil_classes = {name: getattr(importlib.import_module("transformers"), f"{name}Pil") for name in PIL_FALLBACKS}
    # Loading image-processing code makes transformers re-create its top module (processing_utils imports
    # it afresh), so the names go on the module as it is now, not as it was before those classes loaded.
    for name, pil_class in pil_classes.items():
        setattr(importlib.import_module("transformers"), name, pil_class)


bind_pil_image_processors()

from diffusers import FluxPipeline  # noqa: E402  (after the names are bound)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402  (the same module)

__all__ = ["FluxPipeline", "calculate_shift"]
