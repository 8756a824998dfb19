"""ST-LPIPS: agreement with the authors' own forward pass, checkpoint mapping, and the properties of a loss.

Tests that need the weights skip when the ``stlpips-pytorch`` wheel is not installed.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtok.data import load_image, sample_path
from vtok.errors import CheckpointError, ConfigError
from vtok.losses import STLPIPS, perceptual
from vtok.losses.perceptual import _checkpoint_keys, default_weights_path

NEEDS_WEIGHTS = pytest.mark.skipif(
    default_weights_path("vgg") is None,
    reason="ST-LPIPS weights not installed (pip install stlpips-pytorch)",
)


@pytest.fixture(scope="module")
def vgg() -> STLPIPS:
    if default_weights_path("vgg") is None:
        pytest.skip("ST-LPIPS weights not installed (pip install stlpips-pytorch)")
    return STLPIPS("vgg")


def crop(name: str, top: int, left: int, h: int = 64, w: int = 64) -> torch.Tensor:
    image, _ = load_image(sample_path(name))
    return image[:, top : top + h, left : left + w].unsqueeze(0)


# ---------------------------------------------------------------- the authors' implementation as oracle


@contextmanager
def authors_package() -> Iterator[types.ModuleType]:
    """Import ``stlpips_pytorch.stlpips`` with inert stand-ins for torchvision, torchsummary and IPython.

    The package imports them at module level, but its shift-tolerant networks are built from its own
    ``models_lpf`` code. The stand-ins raise on any attribute use, so a test passing proves the forward pass
    compared against is entirely the package's. Everything imported here is removed from sys.modules after.
    """

    def inert(name: str) -> types.ModuleType:
        module = types.ModuleType(name)

        def refuse(attr: str) -> None:
            if attr.startswith("__"):  # the import system probing the module
                raise AttributeError(attr)
            raise AssertionError(f"the ST-LPIPS code path used {name}.{attr}")

        module.__getattr__ = refuse  # type: ignore[method-assign]
        return module

    torchvision = inert("torchvision")
    torchvision.models = inert("torchvision.models")  # type: ignore[attr-defined]
    ipython, torchsummary = inert("IPython"), inert("torchsummary")
    ipython.embed = torchsummary.summary = lambda *a, **k: None  # type: ignore[attr-defined]
    stubs = {"torchvision": torchvision, "torchvision.models": torchvision.models, "IPython": ipython,
             "torchsummary": torchsummary}
    before = dict(sys.modules)
    sys.modules.update(stubs)
    try:
        yield importlib.import_module("stlpips_pytorch.stlpips")
    finally:
        for name in list(sys.modules):
            if name not in before:
                del sys.modules[name]
        for name in stubs:
            if name in before:
                sys.modules[name] = before[name]
            else:
                sys.modules.pop(name, None)


def reference_pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    astronaut = crop("astronaut", 40, 90)
    shifted = crop("astronaut", 40, 91)  # one pixel to the right
    noisy = (astronaut + 0.08 * torch.randn(astronaut.shape, generator=g)).clamp(0, 1)
    return [
        ("random vs random", torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)),
        ("photo vs noisy photo", astronaut, noisy),
        ("photo vs 1-px shift", astronaut, shifted),
        ("photo vs other photo", astronaut, crop("chelsea", 20, 60)),
    ]


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_matches_the_authors_forward_pass(net: str) -> None:
    pytest.importorskip("stlpips_pytorch", reason="stlpips-pytorch not installed (pip install stlpips-pytorch)")
    mine = STLPIPS(net)
    state = torch.load(mine.weights_path, map_location="cpu", weights_only=True)
    with authors_package() as stlpips:
        ref = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False)
    # The package loads with strict=False: make sure its model really holds every tensor of the file.
    ref_state = ref.state_dict()
    aliases = {k for k in ref_state if k.startswith("lins.")}  # its ModuleList view of lin0..lin4
    assert set(ref_state) - aliases == set(state)
    assert all(torch.equal(ref_state[k], v) for k, v in state.items())

    pairs = reference_pairs()
    x = torch.cat([a for _, a, _ in pairs])
    y = torch.cat([b for _, _, b in pairs])
    with torch.no_grad():
        expected = ref(x, y, normalize=True).flatten()  # the package's own [0, 1] -> [-1, 1] switch
        got = mine(x, y)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # odd size, and the [-1, 1] path of the package (normalize=False) against our conversion
        a, b = crop("coffee", 10, 30, 37, 45), crop("coffee", 12, 31, 37, 45)
        torch.testing.assert_close(mine(a, b), ref(2 * a - 1, 2 * b - 1).flatten(), rtol=0, atol=1e-5)
    assert (expected > 0).all() and expected.unique().numel() == len(pairs)


# ---------------------------------------------------------------- checkpoint and loading


@NEEDS_WEIGHTS
@pytest.mark.parametrize(("net", "n_params"), [("vgg", 14_716_160), ("alex", 2_470_848)])
def test_every_checkpoint_tensor_is_loaded(net: str, n_params: int) -> None:
    m = STLPIPS(net)
    state = torch.load(m.weights_path, map_location="cpu", weights_only=True)
    names = _checkpoint_keys(perceptual._LAYOUTS[net])
    own = m.state_dict()
    assert set(names) == set(state) and set(names.values()) == set(own)  # a bijection, nothing left over
    for theirs, mine in names.items():
        assert torch.equal(own[mine], state[theirs]), theirs
    assert sum(p.numel() for p in m.parameters()) == n_params
    # The checkpoint's fixed tensors are the documented constants.
    binomial = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    for key, value in state.items():
        if key.endswith(".filt"):
            assert torch.equal(value, binomial.expand_as(value)), key
    torch.testing.assert_close(m.shift.flatten(), torch.tensor(perceptual._SHIFT))
    torch.testing.assert_close(m.scale.flatten(), torch.tensor(perceptual._SCALE))


def test_locating_the_weights_does_not_import_the_package() -> None:
    was_loaded = "stlpips_pytorch" in sys.modules
    default_weights_path("vgg")
    assert ("stlpips_pytorch" in sys.modules) == was_loaded


def test_missing_weights_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perceptual, "default_weights_path", lambda net: None)
    with pytest.raises(ConfigError, match="pip install stlpips-pytorch") as info:
        STLPIPS()
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="weights_path"):
        STLPIPS(weights_path="/nonexistent/vgg_shift_tolerant.pth")


def test_foreign_or_damaged_files_are_rejected(tmp_path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, wrong)
    with pytest.raises(CheckpointError, match="not an ST-LPIPS 'vgg' state dict"):
        STLPIPS(weights_path=str(wrong))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        STLPIPS(weights_path=str(junk))


@NEEDS_WEIGHTS
def test_wrong_shapes_are_rejected(tmp_path) -> None:
    state = torch.load(default_weights_path("vgg"), map_location="cpu", weights_only=True)
    state["lin4.model.1.weight"] = torch.zeros(1, 256, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"lin4\.model\.1\.weight has shape"):
        STLPIPS(weights_path=str(path))


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="net"):
        STLPIPS(net="squeeze")
    with pytest.raises(ConfigError, match="reduction"):
        STLPIPS(reduction="max")


# ---------------------------------------------------------------- properties of the distance


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_identity_is_zero_and_distance_is_symmetric(vgg: STLPIPS, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(vgg(x, x), torch.zeros(2))
        d_xy, d_yx = vgg(x, y), vgg(y, x)
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-6, atol=1e-7)


def test_distance_grows_with_noise(vgg: STLPIPS) -> None:
    x = crop("astronaut", 60, 100, 48, 48)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    sigmas = [0.01, 0.03, 0.1, 0.3]
    noisy = torch.cat([x + s * noise for s in sigmas])  # not clamped: keep the perturbation exactly scaled
    with torch.no_grad():
        d = vgg(x.expand_as(noisy), noisy)
    assert (d.diff() > 0).all(), d


def test_gradients_reach_the_images_not_the_weights(vgg: STLPIPS) -> None:
    x = crop("astronaut", 0, 0, 32, 32).requires_grad_()
    y = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
    vgg(x, y).sum().backward()
    for image in (x, y):
        assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in vgg.parameters())
    # a descent step on the distance brings the image closer
    with torch.no_grad():
        before = vgg(x, y)
        after = vgg(x - 0.01 * x.grad.sign(), y)
    assert after < before


def test_zero_feature_vectors_give_finite_gradients() -> None:
    f = torch.zeros(1, 4, 2, 2)
    f[0, :, 0, 0] = 1.0
    f.requires_grad_()
    perceptual._unit_channels(f).sum().backward()
    assert torch.isfinite(f.grad).all()


def test_batch_equals_singles_and_reductions(vgg: STLPIPS) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.cat([crop("astronaut", 0, 0, 40, 40), torch.rand(1, 3, 40, 40, generator=g)])
    y = torch.cat([crop("astronaut", 1, 0, 40, 40), torch.rand(1, 3, 40, 40, generator=g)])
    with torch.no_grad():
        batched = vgg(x, y)
        singles = torch.cat([vgg(x[i : i + 1], y[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-7)
        assert batched.shape == (2,)
        vgg.reduction = "mean"
        mean = vgg(x, y)
        vgg.reduction = "sum"
        total = vgg(x, y)
        vgg.reduction = "none"
    torch.testing.assert_close(mean, batched.mean())
    torch.testing.assert_close(total, batched.sum())
    assert mean.shape == total.shape == ()


def test_train_mode_changes_nothing(vgg: STLPIPS) -> None:
    x, y = crop("chelsea", 0, 0, 32, 32), crop("chelsea", 0, 2, 32, 32)
    with torch.no_grad():
        d_eval = vgg(x, y)
        vgg.train()
        d_train = vgg(x, y)
        vgg.eval()
    assert torch.equal(d_eval, d_train)


@pytest.mark.parametrize(("h", "w"), [(37, 45), (32, 32), (18, 18), (18, 70)])
def test_odd_and_small_sizes(vgg: STLPIPS, h: int, w: int) -> None:
    g = torch.Generator().manual_seed(h * w)
    x, y = torch.rand(1, 3, h, w, generator=g), torch.rand(1, 3, h, w, generator=g)
    with torch.no_grad():
        d = vgg(x, y)
    assert d.shape == (1,) and torch.isfinite(d).all() and d.item() > 0


@NEEDS_WEIGHTS
@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_min_size_is_exact(net: str) -> None:
    m = STLPIPS(net)
    n = m.min_size
    too_small = torch.rand(1, 3, n - 1, n - 1)
    with pytest.raises(ValueError, match=f"at least {n}x{n}"):
        m(too_small, too_small)
    with torch.no_grad(), pytest.raises(RuntimeError):  # the network itself cannot run one pixel smaller
        m.features(m.to_network_input(too_small))
    ok = torch.rand(1, 3, n, n)
    with torch.no_grad():
        assert torch.isfinite(m(ok, ok.flip(-1))).all()


def test_grayscale_is_replicated_to_rgb(vgg: STLPIPS) -> None:
    x = crop("astronaut", 0, 0, 32, 32).mean(1, keepdim=True)
    y = crop("astronaut", 0, 1, 32, 32).mean(1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(vgg(x, y), vgg(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize(
    ("shape_x", "shape_y", "match"),
    [
        ((1, 3, 32, 32), (1, 3, 32, 33), "same shape"),
        ((1, 4, 32, 32), (1, 4, 32, 32), "grayscale"),
        ((1, 2, 32, 32), (1, 2, 32, 32), "grayscale"),
        ((3, 32, 32), (3, 32, 32), "grayscale"),
    ],
)
def test_bad_inputs_are_rejected(vgg: STLPIPS, shape_x: tuple, shape_y: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        vgg(torch.rand(shape_x), torch.rand(shape_y))


def test_autocast_keeps_float32_output(vgg: STLPIPS) -> None:
    x, y = crop("coffee", 0, 0, 24, 24), crop("coffee", 0, 1, 24, 24)
    with torch.no_grad():
        ref = vgg(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = vgg(x, y)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.1, atol=1e-3)
