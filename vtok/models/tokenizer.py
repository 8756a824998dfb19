"""``Tokenizer``: a 2D conv encoder + any quantizer + a conv decoder behind the one vtok contract."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtok.errors import ConfigError, InputError
from vtok.models.conv2d import ConvConfig, Decoder, Encoder
from vtok.quantizers.base import QuantizerOutput, build_quantizer
from vtok.tokens import TokenBatch


@dataclass(frozen=True)
class TokenizerInfo:
    """What benchmarks and generators need to know about a tokenizer, and nothing about its internals.

    ``sub_vocab_sizes`` are the vocabularies of the ids that describe one position (one entry for a
    plain codebook; one per level/group for residual/grouped; one per sub-token for factorised LFQ);
    their product is the number of distinct codes a position can take.
    """

    name: str | None
    token_kind: str  # "2d" | "1d" | "3d"
    downsample: tuple[int, ...]
    continuous: bool
    codebook_size: int
    num_codebooks: int
    sub_vocab_sizes: tuple[int, ...]
    bits_per_token: float
    latent_channels: int
    image_channels: int = 3
    value_range: tuple[float, float] = (0.0, 1.0)

    @property
    def vocab_size(self) -> int:
        """Distinct values of one id slot (the codebook size); 0 for continuous tokenizers."""
        return self.codebook_size

    def grid_for(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """Token grid for an input of spatial ``size`` (inputs are padded up to a multiple of f)."""
        if len(size) != len(self.downsample):
            raise ValueError(f"size {size} has {len(size)} dims; this tokenizer expects {len(self.downsample)}")
        return tuple(math.ceil(s / f) for s, f in zip(size, self.downsample, strict=True))

    def bits_per_pixel(self, size: tuple[int, ...]) -> float:
        """Bits spent on an input of spatial ``size`` divided by its pixel count."""
        return self.bits_per_token * math.prod(self.grid_for(size)) / math.prod(size)


@dataclass
class TokenizerOutput:
    """Result of ``tok(images)``: the reconstruction (unclamped, image range) and the quantizer's terms."""

    reconstruction: Tensor
    quantizer: QuantizerOutput
    tokens: TokenBatch
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def losses(self) -> dict[str, Tensor]:
        """Named, weighted quantizer loss terms; the trainer adds reconstruction/perceptual/GAN terms."""
        return self.quantizer.losses

    @property
    def stats(self) -> dict[str, Tensor]:
        """Detached quantizer diagnostics (usage, perplexity, ...)."""
        return self.quantizer.stats


def check_images(images: Tensor, channels: int) -> None:
    """Reject tensors that are not float ``(B, channels, H, W)`` with one clear line."""
    if not isinstance(images, Tensor):
        raise InputError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != channels:
        raise InputError(f"images must have shape (B, {channels}, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputError(f"images must be float in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise InputError(f"images must be non-empty, got shape {tuple(images.shape)}")


class Tokenizer(nn.Module):
    """Encoder → 1×1 conv → quantizer → 1×1 conv → decoder.

    Public tensors are float NCHW in [0, 1] of any H×W: inputs are padded (edge replication) to a
    multiple of f and outputs cropped back. Internally the networks see [-1, 1].
    """

    architecture: ClassVar[str] = "conv2d"

    def __init__(
        self,
        encoder: dict[str, Any] | None = None,
        quantizer: dict[str, Any] | None = None,
        decoder: dict[str, Any] | None = None,
        name: str | None = None,
    ):
        super().__init__()
        if quantizer is None:
            raise ConfigError("a tokenizer config needs a 'quantizer' section")
        enc_cfg = ConvConfig.from_dict(dict(encoder or {}))
        dec_cfg = ConvConfig.from_dict(dict(decoder) if decoder is not None else enc_cfg.to_dict())
        if enc_cfg.downsample != dec_cfg.downsample:
            raise ConfigError(f"encoder f={enc_cfg.downsample} but decoder f={dec_cfg.downsample}")
        self.name = name
        self.encoder = Encoder(enc_cfg)
        self.quantizer = build_quantizer(quantizer)
        self.decoder = Decoder(dec_cfg)
        self.quant_conv = nn.Conv2d(enc_cfg.z_channels, self.quantizer.in_channels, 1)
        self.post_quant_conv = nn.Conv2d(self.quantizer.out_channels, dec_cfg.z_channels, 1)
        self.factor = enc_cfg.downsample

    # --- configuration ---------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """The dict that rebuilds this model (``config.json``)."""
        return {
            "architecture": self.architecture,
            "name": self.name,
            "encoder": self.encoder.cfg.to_dict(),
            "decoder": self.decoder.cfg.to_dict(),
            "quantizer": self.quantizer.get_config(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Tokenizer:
        """Build a randomly initialised model from :meth:`get_config` output."""
        config = {k: v for k, v in config.items() if k != "architecture"}
        unknown = sorted(set(config) - {"encoder", "decoder", "quantizer", "name"})
        if unknown:
            raise ConfigError(f"unknown tokenizer config key(s) {unknown}")
        return cls(**config)

    @property
    def info(self) -> TokenizerInfo:
        """Downsample factor, vocabulary, bits per token and value range."""
        q = self.quantizer
        return TokenizerInfo(
            name=self.name,
            token_kind="2d",
            downsample=(self.factor, self.factor),
            continuous=q.continuous,
            codebook_size=q.codebook_size,
            num_codebooks=q.num_codebooks,
            sub_vocab_sizes=tuple(q.sub_vocab_sizes),
            bits_per_token=q.bits_per_token,
            latent_channels=q.out_channels,
            image_channels=self.encoder.cfg.image_channels,
        )

    # --- the contract ----------------------------------------------------------------------------
    def _prepare(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        check_images(images, self.encoder.cfg.image_channels)
        h, w = images.shape[-2:]
        f = self.factor
        ph, pw = (-h) % f, (-w) % f
        x = images.to(self._dtype()) * 2.0 - 1.0
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x, (int(h), int(w))

    def _dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _quantize(self, images: Tensor) -> tuple[QuantizerOutput, tuple[int, int]]:
        x, size = self._prepare(images)
        h = self.quant_conv(self.encoder(x))
        with torch.autocast(device_type=h.device.type, enabled=False):
            q = self.quantizer(h.float())
        return q, size

    def _tokens(self, q: QuantizerOutput, size: tuple[int, int]) -> TokenBatch:
        grid = tuple(q.quantized.shape[2:])
        if self.quantizer.continuous:
            return TokenBatch(ids=None, latents=q.quantized, grid=grid, size=size, model=self.name)
        assert q.indices is not None
        return TokenBatch(ids=q.indices.long(), latents=None, grid=grid, size=size, model=self.name)

    @torch.no_grad()
    def encode(self, images: Tensor) -> TokenBatch:
        """Images ``(B, C, H, W)`` in [0, 1] → tokens on a ``ceil(H/f) × ceil(W/f)`` grid.

        Inference only (no autograd graph); training goes through :meth:`forward`.
        """
        q, size = self._quantize(images)
        return self._tokens(q, size)

    def _codes(self, tokens: TokenBatch) -> Tensor:
        if tokens.latents is not None:
            if not self.quantizer.continuous:
                raise InputError("this tokenizer is discrete; decode needs ids, got latents")
            return tokens.latents.to(self._dtype())
        if self.quantizer.continuous:
            raise InputError("this tokenizer is continuous; decode needs latents, got ids")
        ids = tokens.ids
        assert ids is not None
        expected = self.quantizer.index_shape(ids.shape[0], tokens.grid)
        if tuple(ids.shape) != expected:
            raise InputError(f"token ids have shape {tuple(ids.shape)}, expected {expected} for grid {tokens.grid}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.quantizer.codebook_size):
            raise InputError(
                f"token ids span [{int(ids.min())}, {int(ids.max())}] but the codebook has "
                f"{self.quantizer.codebook_size} entries"
            )
        with torch.autocast(device_type=ids.device.type, enabled=False):
            return self.quantizer.indices_to_codes(ids.long()).to(self._dtype())

    def _decode_codes(self, codes: Tensor) -> Tensor:
        # one memory layout on both paths: conv kernels round differently for channels-last inputs,
        # which would make decode(encode(x)) drift from forward(x)
        return self.decoder(self.post_quant_conv(codes.contiguous()))

    def _check_grid(self, tokens: TokenBatch) -> None:
        expected = self.info.grid_for(tokens.size)
        if tokens.grid != expected:
            raise InputError(f"token grid {tokens.grid} does not fit size {tokens.size} (expected {expected})")

    @torch.no_grad()
    def decode(self, tokens: TokenBatch) -> Tensor:
        """Tokens → images ``(B, C, H, W)`` in [0, 1] at the size the tokens were encoded from (no autograd)."""
        self._check_grid(tokens)
        x = self._decode_codes(self._codes(tokens))
        h, w = tokens.size
        return ((x[..., :h, :w].float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def forward(self, images: Tensor) -> TokenizerOutput:
        """Reconstruct ``images`` and return the quantizer's loss terms for training.

        The reconstruction is in image range ([0, 1] scale) but not clamped, so losses see gradients.
        """
        q, size = self._quantize(images)
        x = self._decode_codes(q.quantized.to(self._dtype()))
        h, w = size
        recon = (x[..., :h, :w] + 1.0) / 2.0
        return TokenizerOutput(reconstruction=recon, quantizer=q, tokens=self._tokens(q, size))

    def reconstruct(self, images: Tensor) -> Tensor:
        """``decode(encode(images))`` without gradients, clamped to [0, 1]."""
        return self.decode(self.encode(images))

    @property
    def last_layer(self) -> nn.Parameter:
        """Decoder's final weight, for adaptive GAN weighting."""
        return self.decoder.last_layer

    def save_pretrained(self, directory: str) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (atomically)."""
        from vtok.checkpoint import save_pretrained

        save_pretrained(self, directory)
