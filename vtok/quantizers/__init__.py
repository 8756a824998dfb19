"""Quantizer families, one file each; :func:`build_quantizer` builds any of them from config."""

from vtok.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput, build_quantizer, codebook_stats

__all__ = ["QUANTIZERS", "Quantizer", "QuantizerOutput", "build_quantizer", "codebook_stats"]
