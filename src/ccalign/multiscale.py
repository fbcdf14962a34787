"""VAR's multi-scale residual quantiser, shared by the codec (``tokenizers.var_vq``) and the model.

Latents <-> codes of every scale, and VAR's teacher-forcing inputs.

One codebook serves all scales. Encoding quantises the residual scale by scale from the coarsest:
area-downsample the residual to pn x pn (the last scale as is), nearest code by squared
distance, bicubic-upsample the code vectors to the latent side, pass them through the scale's
"phi" (h -> (1 - r) h + r conv3x3(h)), add to f_hat and subtract from the residual. Codes are
concatenated scale by scale, raster order within a scale. K phi convs are shared over the
scales: scale si uses the one whose tick (``phi_ticks``) lies nearest si / (S - 1).

Every computation runs in float32 whatever the weights' dtype, so a bf16 copy of a VAR model
builds the same teacher-forcing input as the float32 one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def phi_ticks(count: int) -> list[float]:
    """Positions in [0, 1] of ``count`` shared phis, as VAR computes them (np.linspace)."""
    edge = 1 / 3 / count if count == 4 else 1 / 2 / count
    start, stop = edge, 1 - edge
    if count == 1:
        return [start]
    step = (stop - start) / (count - 1)
    return [start + i * step for i in range(count - 1)] + [stop]


def phi_index(si: int, num_scales: int, count: int) -> int:
    """Index of the phi that scale ``si`` of ``num_scales`` uses (nearest tick, first on ties)."""
    at = si / (num_scales - 1)
    distances = [abs(tick - at) for tick in phi_ticks(count)]
    return distances.index(min(distances))


class Phi(nn.Conv2d):
    """Residual 3x3 conv on code vectors: (1 - ratio) h + ratio conv(h)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: Tensor) -> Tensor:
        conv = F.conv2d(h, self.weight.to(h.dtype), self.bias.to(h.dtype), padding=1)
        return h.mul(1 - self.ratio) + conv.mul(self.ratio)


class PhiList(nn.Module):
    """The K shared phis under VAR's key names (``quant_resi.qresi_ls.<k>``)."""

    def __init__(self, channels: int, count: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(count))


class MultiScaleQuantizer(nn.Module):
    """Codebook (V, C) and K phis; converts between latents f (B, C, n, n), codes (B, L) and
    VAR's teacher-forcing input. ``usage_buffer`` adds VAR's ``ema_vocab_hit_SV`` (S, V)."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        patch_nums: Sequence[int],
        num_phi: int = 4,
        phi_ratio: float = 0.5,
        usage_buffer: bool = True,
    ):
        super().__init__()
        if len(patch_nums) < 2 or list(patch_nums) != sorted(set(patch_nums)):
            raise ValueError(
                f"patch_nums must be at least two increasing sides, got {tuple(patch_nums)}"
            )
        if num_phi < 1 or not 0 < phi_ratio <= 1:
            raise ValueError(
                f"need num_phi >= 1 and 0 < phi_ratio <= 1; got {num_phi}, {phi_ratio}"
            )
        self.vocab_size, self.dim = vocab_size, dim
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.embedding = nn.Embedding(vocab_size, dim)
        self.quant_resi = PhiList(dim, num_phi, phi_ratio)
        if usage_buffer:
            self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self._phi_of_scale = [
            phi_index(si, len(self.patch_nums), num_phi) for si in range(len(self.patch_nums))
        ]

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def side(self) -> int:
        """Latent side: the last scale's."""
        return self.patch_nums[-1]

    def phi(self, si: int) -> Phi:
        return self.quant_resi.qresi_ls[self._phi_of_scale[si]]

    def scale_slices(self) -> list[slice]:
        """Where each scale's codes lie in the (B, L) sequence."""
        out, start = [], 0
        for pn in self.patch_nums:
            out.append(slice(start, start + pn * pn))
            start += pn * pn
        return out

    def split_codes(self, codes: Tensor) -> list[Tensor]:
        """(B, L) codes -> one (B, pn * pn) tensor per scale, checking length and range."""
        if codes.dim() != 2 or codes.shape[1] != self.seq_len:
            raise ValueError(
                f"expected codes (B, {self.seq_len}) for scales {self.patch_nums}, got shape "
                f"{tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(
                f"codes span [{int(codes.min())}, {int(codes.max())}] but the codebook has "
                f"{self.vocab_size} entries; use the tokenizer the codes came from"
            )
        return [codes[:, s] for s in self.scale_slices()]

    def code_map(self, codes: Tensor) -> Tensor:
        """Codes (B, pn * pn) of one scale -> float32 code vectors (B, C, pn, pn)."""
        b, n = codes.shape
        side = round(n**0.5)
        vectors = F.embedding(codes, self.embedding.weight.float())
        return vectors.transpose(1, 2).view(b, self.dim, side, side)

    def upsampled(self, si: int, h: Tensor) -> Tensor:
        """phi_si(h brought to the latent side by bicubic interpolation; the last scale as is)."""
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(self.side, self.side), mode="bicubic")
        return self.phi(si)(h)

    @torch.no_grad()
    def encode(self, f: Tensor, chunk_rows: int = 16384) -> Tensor:
        """Latents (B, C, n, n) -> codes (B, L), by residual quantisation over the scales."""
        return torch.cat([idx for _, idx in self._quantize_scales(f, chunk_rows)], dim=1)

    @torch.no_grad()
    def residuals(self, f: Tensor, chunk_rows: int = 16384) -> Tensor:
        """The vectors each scale quantises (its downsampled residual), all scales stacked as
        rows (M, C): where dead codes are restarted when training a small multi-scale VQ."""
        return torch.cat([z for z, _ in self._quantize_scales(f, chunk_rows)])

    def _quantize_scales(self, f: Tensor, chunk_rows: int):
        """Yield (residual rows (B pn^2, C), codes (B, pn^2)) scale by scale, coarsest first."""
        f = f.float()
        b, c, n, _ = f.shape
        if c != self.dim or n != self.side or f.shape[3] != n:
            raise ValueError(
                f"latents must be (B, {self.dim}, {self.side}, {self.side}), got {tuple(f.shape)}"
            )
        rest = f.clone()
        book = self.embedding.weight.float()
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = rest if si == last else F.interpolate(rest, size=(pn, pn), mode="area")
            rows = z.permute(0, 2, 3, 1).reshape(-1, c)
            idx = self._nearest(rows, book, chunk_rows)
            if si != last:  # the last scale's residual is not needed afterwards
                h = F.embedding(idx.view(b, pn, pn), book).permute(0, 3, 1, 2)
                h = F.interpolate(h, size=(n, n), mode="bicubic")
                rest.sub_(self.phi(si)(h.contiguous()))
            yield rows, idx.view(b, pn * pn)

    @staticmethod
    def _nearest(z: Tensor, book: Tensor, chunk_rows: int) -> Tensor:
        """Index of the nearest code (squared Euclidean distance) for each row of z (M, C)."""
        book_sq = book.square().sum(dim=1)
        out = []
        for part in z.split(chunk_rows):
            d = part.square().sum(dim=1, keepdim=True) + book_sq
            d.addmm_(part, book.T, alpha=-2, beta=1)
            out.append(d.argmin(dim=1))
        return torch.cat(out)

    def forward(self, f: Tensor, beta: float = 0.25) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass (VAR's VQVAE training): (f_hat with straight-through gradients to f,
        VQ loss, codes (B, L)).

        The loss averages over the scales (1) beta |sg(f_hat_si) - f|^2, which pulls the encoder
        towards the codes, and (2) |f_hat_si - sg(f)|^2, which trains codebook and phis; f_hat_si
        is the sum up to scale si.
        """
        codes = self.encode(f.detach())
        target = f.detach().float()
        f_hat, loss = torch.zeros_like(target), target.new_zeros(())
        for si, idx in enumerate(self.split_codes(codes)):
            f_hat = f_hat + self.upsampled(si, self.code_map(idx))
            loss = loss + beta * F.mse_loss(f_hat.detach(), f.float()) + F.mse_loss(f_hat, target)
        straight_through = f.float() + (f_hat - target).detach()
        return straight_through, loss / len(self.patch_nums), codes

    @torch.no_grad()
    def codes_to_fhat(self, codes: Tensor) -> Tensor:
        """Codes (B, L) -> float32 f_hat (B, C, n, n): the sum of every scale's phi(upsampled)."""
        scales = self.split_codes(codes)
        f_hat = torch.zeros(codes.shape[0], self.dim, self.side, self.side, device=codes.device)
        for si, idx in enumerate(scales):
            f_hat.add_(self.upsampled(si, self.code_map(idx)))
        return f_hat

    @torch.no_grad()
    def teacher_forcing_input(self, codes: Tensor) -> Tensor:
        """Codes (B, L) -> VAR's input (B, L - first, C): f_hat after scales 0..si, area-
        downsampled to the side of scale si + 1, flattened in raster order, for si = 0..S-2."""
        scales = self.split_codes(codes)
        b = codes.shape[0]
        f_hat = torch.zeros(b, self.dim, self.side, self.side, device=codes.device)
        pieces = []
        for si in range(len(self.patch_nums) - 1):
            h = F.interpolate(self.code_map(scales[si]), size=(self.side,) * 2, mode="bicubic")
            f_hat.add_(self.phi(si)(h))
            pieces.append(self.next_scale_input(si, f_hat))
        return torch.cat(pieces, dim=1)

    def next_scale_input(self, si: int, f_hat: Tensor) -> Tensor:
        """f_hat area-downsampled to scale si + 1, as (B, pn^2, C) rows in raster order."""
        pn = self.patch_nums[si + 1]
        small = F.interpolate(f_hat, size=(pn, pn), mode="area")
        return small.view(f_hat.shape[0], self.dim, -1).transpose(1, 2)
