"""Training losses. ``STLPIPS``: the shift-tolerant perceptual distance (Ghildyal & Liu 2022)."""

from vtok.losses.perceptual import STLPIPS

__all__ = ["STLPIPS"]
