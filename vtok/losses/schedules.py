"""Step-dependent loss scales: the GAN warm-up ramp and the quantizer entropy schedule.

Both are pure functions of the optimizer step (a Python ``int``) returning a Python ``float``, so they need no
state in checkpoints: a resumed run recomputes the same scale from the step alone.
"""

from __future__ import annotations

__all__ = ["entropy_scale", "gan_ramp"]


def _non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def gan_ramp(step: int, start_step: int, warmup_steps: int) -> float:
    """Generator-side GAN weight factor in [0, 1] at ``step``.

    0 before ``start_step``; then ``(step - start_step) / warmup_steps``, reaching 1 at
    ``start_step + warmup_steps`` and staying there. VQGAN (Esser et al. 2021) switches the adversarial term
    on at once at a start step; the sudden extra gradient can knock a converged autoencoder off course, so the
    weight grows linearly instead. The value is exactly 0 at ``start_step`` itself: the discriminator gets
    one update on the current reconstructions before it influences the generator. ``warmup_steps = 0``
    gives the classic step function (1 from ``start_step`` on).
    """
    _non_negative(start_step=start_step, warmup_steps=warmup_steps)
    if step < start_step:
        return 0.0
    if warmup_steps == 0:
        return 1.0
    return min(1.0, (step - start_step) / warmup_steps)


def entropy_scale(step: int, warmup_steps: int, anneal_steps: int, final_scale: float) -> float:
    """Multiplier for a quantizer's entropy term at ``step``.

    Three phases: a linear ramp 0 → 1 over ``warmup_steps`` (the entropy penalty is weak against a random
    encoder and can lock the codebook into a poor spread early, so it is eased in), then a linear move
    1 → ``final_scale`` over the next ``anneal_steps``, then ``final_scale`` for good. With
    ``anneal_steps = 0`` the scale stays at 1 after the warm-up and ``final_scale`` is unused. The MAGVIT
    training recipe (Yu et al. 2023, 2024) anneals its entropy weight linearly from a higher start value
    down to the final one; here that is ``final_scale < 1`` with the quantizer's weight as the start value.
    """
    _non_negative(step=step, warmup_steps=warmup_steps, anneal_steps=anneal_steps)
    if step < warmup_steps:
        return step / warmup_steps
    if anneal_steps == 0:
        return 1.0
    t = min(1.0, (step - warmup_steps) / anneal_steps)
    return 1.0 + (final_scale - 1.0) * t
