"""``train(cfg)``: the whole training run, readable top to bottom.

Setup (models, losses, optimizers, resume) → for each step: tokenizer update over ``accumulate``
micro-batches, then a discriminator update when the GAN is on → periodic logs, validation, checkpoints →
export of the EMA weights with ``save_pretrained``. Nothing here is hidden in callbacks.

Determinism: one ``seed`` initialises the model; the data stream is a pure function of (seed, step, rank);
checkpoints carry the RNG states, so a run killed at any point and resumed from its last checkpoint ends
with the same weights as one that never stopped (CPU, same seed).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from vtok.atomic import atomic_write_text
from vtok.data.images import save_image
from vtok.data.loader import train_batches, validation_images
from vtok.errors import VtokError
from vtok.losses.adversarial import LeCAM, PatchDiscriminator, adaptive_weight, d_loss, g_loss
from vtok.losses.reconstruction import l1_loss, l2_loss
from vtok.losses.schedules import entropy_scale, gan_ramp
from vtok.metrics import psnr, ssim
from vtok.models.registry import model_from_config
from vtok.train import distributed
from vtok.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vtok.train.config import TrainConfig, resolved_model_config, save_config, to_dict
from vtok.train.usage import UsageWindow


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1−decay)·model`` for parameters; buffers (codebook state) are copied."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so a stop always checkpoints."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: give up waiting
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsLog:
    """JSONL metrics (always) and TensorBoard event files (when ``tensorboard`` is installed); rank 0 only."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # drop lines a resumed run will write again
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        except ImportError:
            print("vtok: note: TensorBoard logs need `pip install 'vtok[train]'`; writing metrics.jsonl only",
                  file=sys.stderr)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def validate(model: nn.Module, images: Tensor, device: torch.device, grid_path: Path | None) -> dict[str, float]:
    """PSNR/SSIM of ``decode(encode(x))`` on held-out images; writes an originals-over-reconstructions grid."""
    model.eval()
    recons = torch.cat([model.reconstruct(chunk.to(device)).cpu() for chunk in images.split(16)])
    values = {"val/psnr": float(psnr(recons, images).mean()), "val/ssim": float(ssim(recons, images).mean())}
    if grid_path is not None:
        n = min(8, images.shape[0])
        top, bottom = torch.cat(list(images[:n]), dim=2), torch.cat(list(recons[:n]), dim=2)
        save_image(torch.cat([top, bottom], dim=1), grid_path)
    return values


@dataclass
class TrainResult:
    """What a finished run leaves: the exported model folder and this rank's final modules."""

    export: Path
    model: nn.Module
    ema: nn.Module | None
    steps: int


def train(cfg: TrainConfig, resume: str = "auto") -> TrainResult:
    """Run (or continue) training; returns where the EMA model was exported and the final modules.

    ``resume``: ``"auto"`` continues from the newest checkpoint in the run folder if there is one,
    ``"never"`` refuses to touch a folder that has checkpoints, anything else is a checkpoint path.
    """
    dist = distributed.setup(cfg.trainer.device)
    device = dist.device
    run_dir = Path(cfg.run_dir)
    amp = cfg.trainer.amp == "bf16" or (cfg.trainer.amp == "auto" and device.type == "cuda")

    # ---- models: tokenizer (+ EMA copy), discriminator, perceptual network -------------------------
    torch.manual_seed(cfg.seed)
    model = model_from_config(resolved_model_config(cfg)).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.trainer.ema_decay > 0 else None
    disc = PatchDiscriminator(3, cfg.gan.channels, cfg.gan.layers).to(device) if cfg.gan.weight > 0 else None
    lecam = LeCAM(cfg.gan.lecam_decay).to(device) if disc is not None and cfg.gan.lecam > 0 else None
    perceptual = gram = None
    if cfg.loss.perceptual > 0 or cfg.loss.gram > 0:
        from vtok.losses.perceptual import STLPIPS

        perceptual = STLPIPS(net=cfg.loss.perceptual_net).to(device).eval()
        if cfg.loss.gram > 0:
            from vtok.losses.gram import GramLoss

            gram = GramLoss(perceptual)

    # ---- optimizers and schedules ---------------------------------------------------------------
    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        o = cfg.optim
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, o.warmup_steps, cfg.trainer.steps, o.min_lr_ratio))

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    sched = schedule(opt)
    d_opt = d_sched = None
    if disc is not None:
        d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.gan.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
        d_sched = schedule(d_opt)

    # ---- resume -----------------------------------------------------------------------------------
    start_step, bad_in_row = 0, 0
    found = latest_checkpoint(run_dir) if resume == "auto" else None
    if resume == "never" and latest_checkpoint(run_dir) is not None:
        raise VtokError(f"{run_dir} already holds checkpoints; resume with --resume auto or pick another run_dir")
    ckpt_path = Path(resume) if resume not in ("auto", "never") else found
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            d_opt.load_state_dict(state["d_opt"])
            d_sched.load_state_dict(state["d_sched"])
        if lecam is not None:
            lecam.load_state_dict(state["lecam"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        start_step, bad_in_row = int(state["step"]), int(state.get("bad_in_row", 0))
        if dist.is_main:
            print(f"vtok: resumed from {ckpt_path} at step {start_step}", file=sys.stderr)
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # training-time randomness (dropout, sampling, restarts)

    raw_model = model
    if dist.world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if disc is not None:
            disc = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None)
    raw_disc = disc.module if isinstance(disc, DDP) else disc

    def training_state(step: int) -> dict[str, Any]:
        return {
            "config": to_dict(cfg),
            "model": raw_model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "disc": raw_disc.state_dict() if raw_disc is not None else None,
            "d_opt": d_opt.state_dict() if d_opt is not None else None,
            "d_sched": d_sched.state_dict() if d_sched is not None else None,
            "lecam": lecam.state_dict() if lecam is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "data": {"position": step},  # the stream is a function of (seed, step): the step is the position
            "bad_in_row": bad_in_row,
        }

    # ---- data, logs -------------------------------------------------------------------------------
    accumulate = cfg.optim.accumulate
    batches = train_batches(cfg.data, cfg.seed, start_step, dist.rank, dist.world_size, accumulate)
    val_images = validation_images(cfg.data, cfg.seed) if cfg.data.val and dist.is_main else None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir, start_step, dist.is_main)
    info = raw_model.info
    usage = None if info.continuous else UsageWindow(info.codebook_size, info.num_codebooks)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    last_layer = raw_model.last_layer
    progress = tqdm(total=cfg.trainer.steps, initial=start_step, disable=not (dist.is_main and cfg.trainer.progress),
                    desc="train", dynamic_ncols=True, file=sys.stderr)
    images_per_step = cfg.data.batch_size * accumulate * dist.world_size
    window: dict[str, float] = defaultdict(float)
    window_steps, window_start = 0, time.perf_counter()
    run_start = window_start  # wall time of this process, logged with validations (PSNR-vs-time curves)
    step = start_step

    with StopRequest() as stop:
        for step in range(start_step, cfg.trainer.steps):
            gan_on = disc is not None and step >= cfg.gan.start_step

            # ---- tokenizer update -----------------------------------------------------------------
            opt.zero_grad(set_to_none=True)
            terms_sum: dict[str, float] = defaultdict(float)
            fakes: list[tuple[Tensor, Tensor]] = []
            finite = True
            if raw_disc is not None:
                raw_disc.requires_grad_(False)  # the generator loss must not train the discriminator
            for micro in range(accumulate):
                images = next(batches).to(device, non_blocking=True)
                last = micro == accumulate - 1
                sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
                with sync:
                    with autocast():
                        out = model(images)
                    recon = out.reconstruction.float()
                    terms: dict[str, Tensor] = {}
                    if cfg.loss.l1 > 0:
                        terms["l1"] = cfg.loss.l1 * l1_loss(recon, images)
                    if cfg.loss.l2 > 0:
                        terms["l2"] = cfg.loss.l2 * l2_loss(recon, images)
                    if perceptual is not None and cfg.loss.perceptual > 0:
                        terms["perceptual"] = cfg.loss.perceptual * perceptual(recon, images).mean()
                    if gram is not None:
                        terms["gram"] = cfg.loss.gram * gram(recon, images)
                    for name, value in out.losses.items():
                        scale = cfg.loss.quantizer
                        if name == "entropy":
                            scale *= entropy_scale(step, cfg.loss.entropy_warmup_steps,
                                                   cfg.loss.entropy_anneal_steps, cfg.loss.entropy_final_scale)
                        terms[f"q_{name}"] = scale * value
                    if gan_on:
                        ramp = gan_ramp(step, cfg.gan.start_step, cfg.gan.warmup_steps)
                        g = g_loss(raw_disc(recon), cfg.gan.loss)
                        weight = 1.0
                        if cfg.gan.adaptive and ramp > 0:
                            rec = sum(v for k, v in terms.items() if not k.startswith("q_"))
                            weight = adaptive_weight(rec, g, last_layer, cfg.gan.adaptive_max)
                        terms["gan"] = cfg.gan.weight * ramp * weight * g
                        fakes.append((images, recon.detach()))
                    loss = sum(terms.values())
                    finite = finite and bool(torch.isfinite(loss))
                    (loss / accumulate).backward()
                for k, v in terms.items():
                    terms_sum[k] += float(v.detach()) / accumulate
                for k, v in out.stats.items():
                    terms_sum[f"stat/{k}"] += float(v) / accumulate
                if usage is not None:
                    usage.update(out.tokens.ids)
            if raw_disc is not None:
                raw_disc.requires_grad_(True)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if not (finite and torch.isfinite(grad_norm)):
                bad_in_row += 1
                opt.zero_grad(set_to_none=True)
                tqdm.write(f"vtok: WARNING: non-finite loss or gradient at step {step}; step skipped "
                           f"({bad_in_row}/{cfg.trainer.max_bad_steps} in a row)", file=sys.stderr)
                if bad_in_row >= cfg.trainer.max_bad_steps:
                    if dist.is_main:
                        save_checkpoint(run_dir, step, training_state(step), cfg.trainer.keep_last)
                    raise VtokError(f"training stopped: {bad_in_row} non-finite steps in a row at step {step}; "
                                    "lower optim.lr or check the data")
            else:
                bad_in_row = 0
                opt.step()
                if ema is not None:
                    update_ema(ema, raw_model, cfg.trainer.ema_decay)
            sched.step()

            # ---- discriminator update ---------------------------------------------------------------
            if gan_on:
                d_opt.zero_grad(set_to_none=True)
                for micro, (real, fake) in enumerate(fakes):
                    last = micro == len(fakes) - 1
                    sync = disc.no_sync() if isinstance(disc, DDP) and not last else contextlib.nullcontext()
                    with sync:
                        logits = disc(torch.cat([real, fake]))
                        real_logits, fake_logits = logits.chunk(2)
                        d = d_loss(real_logits, fake_logits, cfg.gan.loss)
                        if lecam is not None:
                            d = d + cfg.gan.lecam * lecam.regularizer(real_logits, fake_logits)
                        (d / len(fakes)).backward()
                    terms_sum["d_loss"] += float(d.detach()) / len(fakes)
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.optim.grad_clip)
                d_opt.step()
                d_sched.step()  # the discriminator's schedule counts its own steps from gan.start_step

            # ---- logs, validation, checkpoints ----------------------------------------------------------
            done = step + 1
            for k, v in terms_sum.items():
                window[k] += v
            window["loss"] += sum(v for k, v in terms_sum.items() if not k.startswith(("stat/", "d_loss")))
            window_steps += 1
            progress.update(1)
            if done % cfg.trainer.log_every == 0 or done == cfg.trainer.steps:
                elapsed = time.perf_counter() - window_start
                values = {k: v / window_steps for k, v in window.items()}
                values["lr"] = sched.get_last_lr()[0]
                values["images_per_s"] = images_per_step * window_steps / max(elapsed, 1e-9)
                if usage is not None:
                    values["usage_window"], values["dead_codes"] = usage.usage()
                progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}")
                log.write(done, values)
                window.clear()
                window_steps, window_start = 0, time.perf_counter()
            if val_images is not None and (done % cfg.trainer.val_every == 0 or done == cfg.trainer.steps):
                values = validate(ema or raw_model, val_images, device, run_dir / "val" / f"step-{done:08d}.png")
                values["train_seconds"] = time.perf_counter() - run_start
                raw_model.train()
                if usage is not None:
                    values["val/usage_window"], values["val/dead_codes"] = usage.usage()
                    if usage.filled >= usage.window and values["val/usage_window"] < cfg.trainer.usage_warn:
                        tqdm.write(f"vtok: WARNING: codebook usage collapsed to {values['val/usage_window']:.1%} "
                                   f"at step {done} ({values['val/dead_codes']} dead codes)", file=sys.stderr)
                log.write(done, values)
                tqdm.write(f"step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()), file=sys.stderr)
            if dist.is_main and (done % cfg.trainer.ckpt_every == 0 or done == cfg.trainer.steps):
                save_checkpoint(run_dir, done, training_state(done), cfg.trainer.keep_last)
            if stop.signal is not None:
                if dist.is_main and done % cfg.trainer.ckpt_every != 0 and done != cfg.trainer.steps:
                    save_checkpoint(run_dir, done, training_state(done), cfg.trainer.keep_last)
                progress.close()
                log.close()
                batches.close()
                raise KeyboardInterrupt(f"stopped at step {done}; checkpoint saved in {run_dir / 'checkpoints'}")
    progress.close()
    log.close()
    batches.close()
    if batches.stats.skipped_count and dist.is_main:
        print(f"vtok: data: {batches.stats.summary()}", file=sys.stderr)

    export = run_dir / "export"
    if dist.is_main:
        (ema or raw_model).save_pretrained(str(export))
        print(f"vtok: exported {'EMA ' if ema is not None else ''}weights to {export}", file=sys.stderr)
    distributed.teardown()
    return TrainResult(export=export, model=raw_model, ema=ema, steps=cfg.trainer.steps)
