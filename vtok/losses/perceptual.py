"""ST-LPIPS: shift-tolerant learned perceptual distance (Ghildyal & Liu, ECCV 2022, arXiv:2207.13686).

ST-LPIPS keeps the recipe of LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric") — unit-normalise the activations of five layers of an ImageNet network, square the
difference between two images, weight the channels with a learned 1×1 head, average over space, add the
five layers — but swaps the backbone for an anti-aliased one (Zhang 2019, "Making Convolutional Networks
Shift-Invariant Again"): every strided operation becomes a stride-1 version followed by a blur-pool, a
3×3 binomial filter ``[1, 2, 1] ⊗ [1, 2, 1] / 16`` applied with stride 2 after reflection-padding 2 pixels
on each side. A one-pixel shift of an image then barely changes its distance to another one.

Network, as trained by the authors (checked against the ``stlpips-pytorch`` 0.0.2 wheel):

* ``vgg`` (default; VGG16 convolutions, 14.7 M weights): five stages of 3×3 convolutions + ReLU with
  64, 128, 256, 512, 512 channels (2, 2, 3, 3, 3 convolutions); stages 2-5 start with a 2×2 max-pool of
  stride 1 and a blur-pool. Features: the last ReLU of each stage.
* ``alex`` (AlexNet, 2.5 M weights): an 11×11 convolution (stride 1, padding 2) + blur-pool + ReLU; then
  [3×3 max-pool stride 1, blur-pool, 5×5 conv 192, ReLU]; [3×3 max-pool stride 1, blur-pool, 3×3 conv
  384, ReLU]; [3×3 conv 256, ReLU]; [3×3 conv 256, ReLU]. Features: the output of each of those groups.

Value range: vtok images are in [0, 1]; the network was trained on [-1, 1] inputs, further shifted and
scaled per channel by the LPIPS constants (shift ``(-.030, -.088, -.188)``, scale ``(.458, .448, .450)``).
Both conversions happen in :meth:`STLPIPS.to_network_input` and nowhere else — feeding [0, 1] images to a
network that expects [-1, 1] is a classic silent bug of LPIPS in training code.

Weights: the wheel ``stlpips-pytorch`` (BSD-2-Clause) ships the full networks as plain state dicts
(``stlpips_pytorch/weights/vST0.0/{vgg,alex}_shift_tolerant.pth``). vtok locates that file without
importing the package (whose modules import torchvision and IPython) and reads it with
``torch.load(weights_only=True)`` into the module below, written for vtok.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtok.errors import CheckpointError, ConfigError

__all__ = ["STLPIPS", "default_weights_path"]

# The LPIPS input scaling (ImageNet mean / std expressed in [-1, 1] units), stored in the checkpoint too.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_BLUR_PAD = 2  # the blur-pool pads (filter size - 1) on every side ("pad_more" in the authors' code)
_NORM_EPS = 1e-10
_REDUCTIONS = ("none", "mean", "sum")

# Each op: ("conv", in, out, kernel, padding) | ("relu",) | ("maxpool", kernel) | ("blur", channels).
# A stage's output is one feature map. The running position of an op over all stages is the index the
# authors' checkpoint uses for it (their torch.nn.Sequential numbering), so the key map derives from this.
Op = tuple
Layout = tuple[tuple[Op, ...], ...]


def _vgg_layout() -> Layout:
    widths = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
    stages: list[tuple[Op, ...]] = []
    c_in = 3
    for i, stage_widths in enumerate(widths):
        ops: list[Op] = [] if i == 0 else [("maxpool", 2), ("blur", c_in)]
        for c_out in stage_widths:
            ops += [("conv", c_in, c_out, 3, 1), ("relu",)]
            c_in = c_out
        stages.append(tuple(ops))
    return tuple(stages)


_ALEX_LAYOUT: Layout = (
    (("conv", 3, 64, 11, 2), ("blur", 64), ("relu",)),
    (("maxpool", 3), ("blur", 64), ("conv", 64, 192, 5, 2), ("relu",)),
    (("maxpool", 3), ("blur", 192), ("conv", 192, 384, 3, 1), ("relu",)),
    (("conv", 384, 256, 3, 1), ("relu",)),
    (("conv", 256, 256, 3, 1), ("relu",)),
)

_LAYOUTS: dict[str, Layout] = {"vgg": _vgg_layout(), "alex": _ALEX_LAYOUT}


def default_weights_path(net: str = "vgg") -> Path | None:
    """Where the installed ``stlpips-pytorch`` wheel keeps the ST-LPIPS weights for ``net``, or ``None``.

    Uses ``importlib.util.find_spec``, which finds a top-level package without running its code.
    """
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
        if path.is_file():
            return path
    return None


class BlurPool2d(nn.Module):
    """Anti-aliased stride-2 downsampling (Zhang 2019): reflection-pad 2, then a per-channel 3×3 binomial blur
    evaluated every other pixel. Output size ``floor((n + 1) / 2) + 1``; needs ``n >= 3`` (reflection)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(taps, taps) / 16.0
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).clone())

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (_BLUR_PAD,) * 4, mode="reflect")
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, groups=x.shape[1])


def _build_stage(ops: tuple[Op, ...]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for op in ops:
        kind = op[0]
        if kind == "conv":
            _, c_in, c_out, k, pad = op
            modules.append(nn.Conv2d(c_in, c_out, k, padding=pad))
        elif kind == "relu":
            modules.append(nn.ReLU(inplace=True))
        elif kind == "maxpool":
            modules.append(nn.MaxPool2d(op[1], stride=1))
        elif kind == "blur":
            modules.append(BlurPool2d(op[1]))
        else:  # pragma: no cover - the layouts above are fixed
            raise AssertionError(f"unknown op {op}")
    return nn.Sequential(*modules)


def _checkpoint_keys(layout: Layout) -> dict[str, str]:
    """Map the authors' state-dict names to this module's: ``net.slice{s+1}.{running index}.*`` ->
    ``stages.{s}.{index in stage}.*``, ``lin{k}.model.1.weight`` -> ``heads.{k}.weight``, and the scaling."""
    names = {"scaling_layer.shift": "shift", "scaling_layer.scale": "scale"}
    position = 0
    for s, ops in enumerate(layout):
        for j, op in enumerate(ops):
            theirs, mine = f"net.slice{s + 1}.{position}", f"stages.{s}.{j}"
            if op[0] == "conv":
                names[f"{theirs}.weight"] = f"{mine}.weight"
                names[f"{theirs}.bias"] = f"{mine}.bias"
            elif op[0] == "blur":
                names[f"{theirs}.filt"] = f"{mine}.kernel"
            position += 1
        names[f"lin{s}.model.1.weight"] = f"heads.{s}.weight"
    return names


def _output_size(n: int, ops: tuple[Op, ...]) -> int | None:
    """Spatial size after ``ops`` for an input of size ``n``, or ``None`` if some op cannot run."""
    for op in ops:
        if op[0] == "conv":
            n = n + 2 * op[4] - op[3] + 1
        elif op[0] == "maxpool":
            n = n - op[1] + 1
        elif op[0] == "blur":
            if n <= _BLUR_PAD:
                return None
            n = (n + 1) // 2 + 1
        if n < 1:
            return None
    return n


def _min_size(layout: Layout) -> int:
    def runs(n: int) -> bool:
        for ops in layout:
            out = _output_size(n, ops)
            if out is None:
                return False
            n = out
        return True

    return next(n for n in range(1, 1024) if runs(n))


def _unit_channels(x: Tensor) -> Tensor:
    """Divide every spatial position's channel vector by its L2 norm (plus LPIPS's 1e-10).

    ``vector_norm`` is used rather than ``sqrt(sum(x**2))``: same values, but where a post-ReLU vector is
    exactly zero its gradient is finite, where the square-root form gives NaN (0 · ∞).
    """
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + _NORM_EPS)


class STLPIPS(nn.Module):
    """ST-LPIPS distance between two image batches (Ghildyal & Liu 2022), frozen, differentiable in the images.

    ``net``: ``"vgg"`` (default; VGG16 backbone) or ``"alex"`` (AlexNet, about 4× faster). ``weights_path``: a
    ``*_shift_tolerant.pth`` file; by default the one inside the installed ``stlpips-pytorch`` wheel.
    ``reduction``: ``"none"`` gives one distance per image ``(B,)``; ``"mean"`` / ``"sum"`` a scalar.

    Inputs: ``(B, C, H, W)`` images in [0, 1] with ``C = 3``, or ``C = 1`` (grayscale, replicated to RGB —
    the same image as an RGB file whose three channels are equal). Any ``H, W >= min_size`` works (18 for
    ``vgg``, 21 for ``alex``). The weights never require grad and there is no dropout or batch norm, so
    ``train()`` / ``eval()`` change nothing; gradients flow to both inputs. Layer-wise normalisation and the
    heads run in float32 even under autocast.
    """

    def __init__(self, net: str = "vgg", weights_path: str | None = None, reduction: str = "none") -> None:
        super().__init__()
        if net not in _LAYOUTS:
            raise ConfigError(f"ST-LPIPS: net must be one of {sorted(_LAYOUTS)}, got {net!r}")
        if reduction not in _REDUCTIONS:
            raise ConfigError(f"ST-LPIPS: reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
        self.net = net
        self.reduction = reduction
        layout = _LAYOUTS[net]
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.stages = nn.ModuleList(_build_stage(ops) for ops in layout)
        widths = [next(op[2] for op in reversed(ops) if op[0] == "conv") for ops in layout]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.min_size = _min_size(layout)
        self.weights_path = self._load(net, weights_path, layout)
        self.requires_grad_(False)
        self.eval()

    def _load(self, net: str, weights_path: str | None, layout: Layout) -> Path:
        if weights_path is None:
            path = default_weights_path(net)
            if path is None:
                raise ConfigError(
                    f"ST-LPIPS: weights for net={net!r} not found; install them with "
                    "`pip install stlpips-pytorch` (vtok reads only its weight file) "
                    "or pass weights_path=<a *_shift_tolerant.pth file>"
                )
        else:
            path = Path(weights_path)
            if not path.is_file():
                raise ConfigError(f"ST-LPIPS: weights_path {str(path)!r} is not a file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling / zip errors of a damaged or foreign file
            raise CheckpointError(f"{path}: cannot read ST-LPIPS weights ({type(e).__name__}: {e})") from None
        names = _checkpoint_keys(layout)
        if not isinstance(state, dict) or set(state) != set(names):
            found = set(state) if isinstance(state, dict) else set()
            missing, extra = sorted(set(names) - found), sorted(found - set(names))
            raise CheckpointError(
                f"{path}: not an ST-LPIPS {net!r} state dict (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        own = self.state_dict()
        for theirs, mine in names.items():
            if state[theirs].shape != own[mine].shape:
                raise CheckpointError(
                    f"{path}: {theirs} has shape {tuple(state[theirs].shape)}, "
                    f"ST-LPIPS {net!r} expects {tuple(own[mine].shape)}"
                )
        self.load_state_dict({mine: state[theirs] for theirs, mine in names.items()}, strict=True)
        return path

    def to_network_input(self, images: Tensor) -> Tensor:
        """[0, 1] images -> the network's input: to [-1, 1], then the LPIPS per-channel shift and scale.

        The only place vtok's [0, 1] convention meets the [-1, 1] range the weights were trained on.
        """
        return (images * 2.0 - 1.0 - self.shift) / self.scale

    def features(self, images: Tensor) -> list[Tensor]:
        """The five feature maps of ``images`` (already :meth:`to_network_input`-converted)."""
        out = []
        h = images
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def _check(self, x: Tensor, y: Tensor) -> None:
        if x.shape != y.shape:
            raise ValueError(f"ST-LPIPS: both image batches must have the same shape, got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"ST-LPIPS: expected images (B, 3, H, W) or grayscale (B, 1, H, W), "
                             f"got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"ST-LPIPS ({self.net}): images must be at least {self.min_size}x{self.min_size} "
                             f"pixels, got {x.shape[-2]}x{x.shape[-1]}")

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """ST-LPIPS distance between ``x`` and ``y`` (images in [0, 1]): ``(B,)`` or a scalar (``reduction``)."""
        self._check(x, y)
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        n = x.shape[0]
        both = torch.cat([x, y]).to(self.shift.dtype)  # one pass through the network for both batches
        feats = self.features(self.to_network_input(both))
        with torch.autocast(device_type=both.device.type, enabled=False):
            dist = both.new_zeros(n, dtype=torch.float32)
            for f, head in zip(feats, self.heads, strict=True):
                f = f.float()
                diff = (_unit_channels(f[:n]) - _unit_channels(f[n:])) ** 2
                dist = dist + F.conv2d(diff, head.weight.float()).mean(dim=(1, 2, 3))
        if self.reduction == "mean":
            return dist.mean()
        if self.reduction == "sum":
            return dist.sum()
        return dist
