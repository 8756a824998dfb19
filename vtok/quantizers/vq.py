"""Vector quantization (VQ-VAE, van den Oord et al. 2017; VQGAN, Esser et al. 2021).

Each latent vector is replaced by its nearest entry of a learned codebook. Options, each from the paper
that introduced it:

- ``codebook_dim``: look codes up in a low-dimensional space through linear in/out projections
  (factorised codes; ViT-VQGAN, Yu et al. 2022; LlamaGen's 8-d codes, Sun et al. 2024).
- ``distance="cosine"``: l2-normalise encoder vectors and codes before the lookup (ViT-VQGAN; LlamaGen).
- ``learning="ema"``: update codes as exponential moving averages of their assigned vectors instead of by
  gradient (VQ-VAE appendix; VQ-VAE-2, Razavi et al. 2019).
- ``kmeans_init``: initialise the codebook by k-means on the first training batch (SoundStream, Zeghidour
  et al. 2021).
- ``dead_code_steps``: replace codes unused for that many steps by encoder outputs of the current batch
  (Jukebox, Dhariwal et al. 2020; SoundStream).
- ``rotation_trick``: pass gradients through a rotation and rescaling that maps the encoder vector onto its
  code instead of copying them (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation
  Trick").

Memory stays bounded for ``K = 2^18`` codes: the search is chunked (:func:`nearest_code`) and the selected
codes are gathered by index, so the codebook gradient is a scatter of ``N`` rows, never an ``N × K`` matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtok.dist import all_reduce_sum_, broadcast_, is_distributed, rank
from vtok.errors import ConfigError
from vtok.quantizers.base import Quantizer, QuantizerOutput, codebook_stats, from_rows, to_rows
from vtok.quantizers.search import DEFAULT_CHUNK_SIZE, nearest_code


def rotate_to_code(e: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """Rotation-trick estimator (Fifty et al. 2024): value ``q``, gradient ``(λR)ᵀ g`` to ``e``.

    ``R`` rotates the direction of ``e`` onto that of ``q`` and ``λ = ||q|| / ||e||``; both are treated
    as constants. With unit vectors ``u = ê``, ``v = q̂`` and ``w = (u + v) / ||u + v||`` the rotation is
    ``R = I − 2wwᵀ + 2vuᵀ`` (the Householder reflection about ``w``, which sends ``u`` to ``−v``, followed
    by the one about ``v``), applied as dot products so no ``D × D`` matrix is built. Rows: ``(N, D)``.
    """
    e_const, q_const = e.detach(), q.detach()
    e_norm = e_const.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q_const.norm(dim=-1, keepdim=True)
    u = e_const / e_norm
    v = q_const / q_norm.clamp_min(eps)
    w = F.normalize(u + v, dim=-1, eps=eps)
    rotated = e - 2.0 * (e * w).sum(-1, keepdim=True) * w + 2.0 * (e * u).sum(-1, keepdim=True) * v
    moved = rotated * (q_norm / e_norm)
    # ``moved`` equals ``q`` up to rounding; swap in the exact value, keep ``moved``'s gradient.
    return (moved - moved.detach()) + q_const


@torch.no_grad()
def kmeans(
    rows: Tensor,
    num_clusters: int,
    iters: int = 10,
    distance: str = "euclidean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Lloyd's k-means on ``rows (N, D)``: ``(num_clusters, D)`` centres.

    Centres start at random rows (with replacement when ``N < num_clusters``); a cluster that loses all
    its rows keeps its previous centre. ``distance="cosine"`` runs spherical k-means (unit centres).
    Assignments use the chunked :func:`nearest_code`. Under ``torch.distributed`` the starting rows come
    from rank 0 and cluster sums/counts are summed over ranks, so every rank gets the same centres from
    all ranks' data.
    """
    n, d = rows.shape
    if rank() == 0:
        pick = torch.randperm(n, device=rows.device)[:num_clusters] if n >= num_clusters else \
            torch.randint(n, (num_clusters,), device=rows.device)
        centres = rows[pick].clone()
    else:
        centres = rows.new_empty(num_clusters, d)
    broadcast_(centres)
    if distance == "cosine":
        centres = F.normalize(centres, dim=-1)
    for _ in range(iters):
        idx, _ = nearest_code(rows, centres, distance, chunk_size)
        counts = all_reduce_sum_(torch.bincount(idx, minlength=num_clusters).to(rows.dtype))
        sums = all_reduce_sum_(torch.zeros_like(centres).index_add_(0, idx, rows))
        means = sums.div_(counts.clamp_min(1.0)[:, None])
        if distance == "cosine":
            means = F.normalize(means, dim=-1)
        centres = torch.where((counts > 0)[:, None], means, centres)
    return centres


class VectorQuantizer(Quantizer):
    """Nearest-code VQ with straight-through gradients; see the module docstring for the options.

    Losses (already weighted): ``commitment = beta · mse(z_e, sg(q))`` pulls the encoder towards its code;
    ``codebook = codebook_weight · mse(sg(z_e), q)`` pulls the code towards the encoder (gradient learning
    only; with EMA the codebook is a buffer updated in training-mode forward passes). ``z_e`` is the
    encoder vector in code space (after ``in_proj`` and, for cosine, normalisation).

    Stats: ``usage``, ``perplexity``; with ``dead_code_steps > 0`` also ``dead`` (codes unused for at
    least that many training steps, counted before this step's restart) and ``restarted`` (codes
    replaced this step).

    EMA state starts as if every code had been assigned one vector equal to itself (counts of 1), so an
    unused code stays where it is instead of being divided by a near-zero count.
    """

    type_name = "vq"

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        distance: str = "euclidean",
        beta: float = 0.25,
        codebook_weight: float = 1.0,
        learning: str = "gradient",
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_steps: int = 0,
        rotation_trick: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if dim < 1 or codebook_size < 1:
            raise ConfigError(f"vq: need dim >= 1 and codebook_size >= 1, got dim={dim}, "
                              f"codebook_size={codebook_size}")
        if codebook_dim is not None and codebook_dim < 1:
            raise ConfigError(f"vq: codebook_dim must be >= 1 (or null for dim), got {codebook_dim}")
        if distance not in ("euclidean", "cosine"):
            raise ConfigError(f"vq: distance must be 'euclidean' or 'cosine', got {distance!r}")
        if learning not in ("gradient", "ema"):
            raise ConfigError(f"vq: learning must be 'gradient' or 'ema', got {learning!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"vq: ema_decay must be in [0, 1), got {ema_decay}")
        if ema_eps <= 0:
            raise ConfigError(f"vq: ema_eps must be > 0, got {ema_eps}")
        if kmeans_iters < 0 or dead_code_steps < 0:
            raise ConfigError(f"vq: kmeans_iters and dead_code_steps must be >= 0, got {kmeans_iters}, "
                              f"{dead_code_steps}")
        if chunk_size < 1:
            raise ConfigError(f"vq: chunk_size must be >= 1, got {chunk_size}")
        self.in_channels = self.out_channels = dim
        self.codebook_size = codebook_size
        self.code_dim = codebook_dim if codebook_dim is not None else dim
        self.distance = distance
        self.beta = beta
        self.codebook_weight = codebook_weight
        self.learning = learning
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.kmeans_iters = kmeans_iters
        self.dead_code_steps = dead_code_steps
        self.rotation_trick = rotation_trick
        self.chunk_size = chunk_size

        self.in_proj: nn.Linear | None = None
        self.out_proj: nn.Linear | None = None
        if self.code_dim != dim:
            self.in_proj = nn.Linear(dim, self.code_dim)
            self.out_proj = nn.Linear(self.code_dim, dim)
        # Small uniform init as in VQGAN's release; k-means init or EMA/gradient updates take it from here.
        init = torch.empty(codebook_size, self.code_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if learning == "ema":
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        if dead_code_steps > 0:
            self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))

    # --- helpers ---------------------------------------------------------------------------------
    def _to_code_space(self, rows: Tensor) -> Tensor:
        if self.in_proj is not None:
            rows = F.linear(rows, self.in_proj.weight.float(), self.in_proj.bias.float())
        if self.distance == "cosine":
            rows = F.normalize(rows, dim=-1)
        return rows

    def _from_code_space(self, rows: Tensor) -> Tensor:
        if self.out_proj is not None:
            rows = F.linear(rows, self.out_proj.weight.float(), self.out_proj.bias.float())
        return rows

    def _lookup(self, idx: Tensor, codebook: Tensor) -> Tensor:
        """Codes for ``idx`` by an index gather (so the codebook gradient is a scatter)."""
        codes = F.embedding(idx, codebook)
        return F.normalize(codes, dim=-1) if self.distance == "cosine" else codes

    def _straight_through(self, z_e: Tensor, q: Tensor) -> Tensor:
        """Value exactly ``q``; gradient to ``z_e`` copied (or rotated), none to the codebook."""
        if not (torch.is_grad_enabled() and z_e.requires_grad):
            return q.detach()
        if self.rotation_trick:
            return rotate_to_code(z_e, q)
        return (z_e - z_e.detach()) + q.detach()  # x - x is exactly 0, so the value is exactly q

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            rows, shape = to_rows(z.float())
            z_e = self._to_code_space(rows)
            if self.training and not bool(self.initialized):
                self._kmeans_init(z_e.detach())
            codebook = self.codebook.float()
            idx, _ = nearest_code(z_e.detach(), codebook, self.distance, self.chunk_size)
            q = self._lookup(idx, codebook)
            losses = {"commitment": self.beta * F.mse_loss(z_e, q.detach())}
            if self.learning == "gradient":
                losses["codebook"] = self.codebook_weight * F.mse_loss(q, z_e.detach())
            quantized = from_rows(self._from_code_space(self._straight_through(z_e, q)), shape)
            indices = idx.reshape(shape)
            stats = codebook_stats(indices, self.codebook_size)
            if self.training:
                stats.update(self._training_update(z_e.detach(), idx))
            elif self.dead_code_steps > 0:
                stats["dead"] = (self.unused_steps >= self.dead_code_steps).sum().float()
                stats["restarted"] = torch.zeros((), device=z.device)
            return QuantizerOutput(quantized=quantized, indices=indices, losses=losses, stats=stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``(B, *S)`` ids -> ``(B, dim, *S)``: the same gather, normalisation and projection as forward."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            shape = tuple(indices.shape)
            codes = self._lookup(indices.reshape(-1).long(), self.codebook.float())
            return from_rows(self._from_code_space(codes), shape)

    # --- state updates outside autograd (training mode only) -------------------------------------
    @torch.no_grad()
    def _kmeans_init(self, z_e: Tensor) -> None:
        if z_e.shape[0] == 0:
            return
        centres = kmeans(z_e, self.codebook_size, self.kmeans_iters, self.distance, self.chunk_size)
        self.codebook.copy_(centres)
        if self.learning == "ema":
            self.ema_sum.copy_(centres)
            self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _training_update(self, z_e: Tensor, idx: Tensor) -> dict[str, Tensor]:
        """EMA codebook update and dead-code restarts, identical on every rank."""
        stats: dict[str, Tensor] = {}
        if self.learning == "gradient" and self.dead_code_steps == 0:
            return stats
        counts = all_reduce_sum_(torch.bincount(idx, minlength=self.codebook_size).to(z_e.dtype))
        if self.learning == "ema":
            self._ema_update(z_e, idx, counts)
        if self.dead_code_steps > 0:
            stats.update(self._restart_dead_codes(z_e, counts))
        return stats

    def _ema_update(self, z_e: Tensor, idx: Tensor, counts: Tensor) -> None:
        decay = self.ema_decay
        self.ema_count.mul_(decay).add_(counts, alpha=1.0 - decay)
        if is_distributed():
            sums = all_reduce_sum_(torch.zeros_like(self.ema_sum).index_add_(0, idx, z_e))
            self.ema_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        else:  # no K × D temporary in a single process
            self.ema_sum.mul_(decay).index_add_(0, idx, z_e, alpha=1.0 - decay)
        # Laplace smoothing keeps every count positive while preserving their total.
        total = self.ema_count.sum()
        k = self.codebook_size
        smoothed = (self.ema_count + self.ema_eps) / (total + k * self.ema_eps) * total
        torch.div(self.ema_sum, smoothed[:, None], out=self.codebook)

    def _restart_dead_codes(self, z_e: Tensor, counts: Tensor) -> dict[str, Tensor]:
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.unused_steps >= self.dead_code_steps).nonzero().squeeze(1)
        n_dead, n_rows = dead.numel(), z_e.shape[0]
        restarted = 0
        if n_dead > 0 and float(counts.sum()) > 0:  # ``counts`` is summed over ranks: same decision everywhere
            # Rank 0 chooses the replacement rows and sends them, so all ranks restart identically.
            if rank() == 0:
                if n_rows == 0:  # only possible in a distributed run where rank 0 got an empty batch
                    fresh = self.codebook[dead].clone()
                else:
                    pick = torch.randperm(n_rows, device=z_e.device)[:n_dead] if n_dead <= n_rows else \
                        torch.randint(n_rows, (n_dead,), device=z_e.device)
                    fresh = z_e[pick].to(self.codebook.dtype)
            else:
                fresh = z_e.new_empty(n_dead, self.code_dim, dtype=self.codebook.dtype)
            broadcast_(fresh)
            self.codebook[dead] = fresh
            if self.learning == "ema":
                self.ema_sum[dead] = fresh
                self.ema_count[dead] = 1.0
            self.unused_steps[dead] = 0
            restarted = n_dead
        device = z_e.device
        return {"dead": torch.tensor(float(n_dead), device=device),
                "restarted": torch.tensor(float(restarted), device=device)}
