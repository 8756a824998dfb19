"""Shared fixtures: tiny models so the whole contract is exercised in seconds."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vtok

TINY_ENCODER: dict[str, Any] = {
    "channels": 8,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "z_channels": 4,
    "attn_levels": [2],
}


def tiny_tokenizer(quantizer: dict[str, Any], **encoder: Any) -> vtok.Tokenizer:
    """An f=4 tokenizer with 8 base channels around ``quantizer``."""
    torch.manual_seed(0)
    return vtok.Tokenizer(encoder={**TINY_ENCODER, **encoder}, quantizer=quantizer, name="tiny").eval()


@pytest.fixture
def tiny_fsq() -> vtok.Tokenizer:
    return tiny_tokenizer({"type": "fsq", "levels": [5, 5, 5, 5]})


@pytest.fixture
def tiny_vq() -> vtok.Tokenizer:
    return tiny_tokenizer({"type": "vq", "dim": 4, "codebook_size": 64})
