"""Backdoor triggers of the Week 4 lecture, batched and checked.

Every trigger is a :class:`Trigger`: call it on one image (C, H, W) or a batch
(B, C, H, W) of floats in [0, 1] (1 or 3 channels, any size) and get new, clamped
images back. :func:`make_trigger` builds one by name:

=================  ==========================  =========================================
name               class                       idea (reference)
=================  ==========================  =========================================
patch              :class:`PatchTrigger`       checkerboard/solid square (Gu et al. 2017)
blend              :class:`BlendTrigger`       blended noise pattern (Chen et al. 2017)
brightness         :class:`BrightnessTrigger`  semantic: brighter image
color_shift        :class:`ColorShiftTrigger`  semantic: tinted image
blur               :class:`BlurTrigger`        semantic: blurred image
dynamic            :class:`DynamicTrigger`     square adapting to image brightness
distributed        :class:`DistributedTrigger` squares in the four corners
sample_specific    :class:`SampleSpecificTrigger`  keyed per-sample pattern
physical           :class:`PhysicalPatch`      optimized sticker (Brown et al. 2017)
sig                :class:`SIGTrigger`         sine-wave signal (Barni et al. 2019)
wanet              :class:`WaNetTrigger`       smooth warping (Nguyen & Tran 2021)
=================  ==========================  =========================================
"""
from __future__ import annotations

from .advanced import DistributedTrigger, DynamicTrigger, SampleSpecificTrigger
from .base import LOCATIONS, Trigger
from .blend import BlendTrigger
from .patch import PatchTrigger
from .physical import PhysicalPatch
from .semantic import BlurTrigger, BrightnessTrigger, ColorShiftTrigger
from .sig import SIGTrigger
from .wanet import WaNetTrigger

TRIGGERS: dict[str, type[Trigger]] = {cls.name: cls for cls in (
    PatchTrigger, BlendTrigger, BrightnessTrigger, ColorShiftTrigger, BlurTrigger, DynamicTrigger,
    DistributedTrigger, SampleSpecificTrigger, PhysicalPatch, SIGTrigger, WaNetTrigger)}
TRIGGER_NAMES: tuple[str, ...] = tuple(TRIGGERS)


def make_trigger(name: str, **kwargs) -> Trigger:
    """Build the trigger called ``name`` (one of :data:`TRIGGER_NAMES`) with its keyword arguments."""
    if name not in TRIGGERS:
        raise ValueError(f"name must be one of {TRIGGER_NAMES}, got {name!r}")
    return TRIGGERS[name](**kwargs)


__all__ = ["Trigger", "LOCATIONS", "TRIGGERS", "TRIGGER_NAMES", "make_trigger", "PatchTrigger",
           "BlendTrigger", "BrightnessTrigger", "ColorShiftTrigger", "BlurTrigger", "DynamicTrigger",
           "DistributedTrigger", "SampleSpecificTrigger", "PhysicalPatch", "SIGTrigger", "WaNetTrigger"]
