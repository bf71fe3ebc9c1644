"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"). Pattern:
facebookresearch/mae `models_mae.py` (random_masking, forward_encoder, forward_decoder,
forward_loss); the encoder is a timm ViT wrapped as lightly's `MaskedVisionTransformerTIMM`."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from methods.diagnostics import embedding_diagnostics
from methods.losses import mae_loss, patchify


def sincos_pos_embed(dim: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    """models_mae.py's fixed 2-D sin-cos position embedding for an h x w grid: [h * w, dim].

    Half the channels encode the column, half the row (`get_2d_sincos_pos_embed`, meshgrid(w, h)),
    each as [sin, cos] of the position times 1 / 10000^(i / (dim / 4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                                torch.arange(w, dtype=torch.float64, device=device), indexing="ij")

    def one_axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # [h*w, dim/4]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()  # [h*w, dim]


def random_masking(n: int, length: int, mask_ratio: float, device: torch.device,
                   noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """models_mae.py `random_masking`: per-sample shuffle by argsort of uniform noise.

    Args:
        noise: [n, length] to sort instead of fresh uniform noise (tests fix the masks with it).

    Returns:
        ids_keep [n, keep] (the visible patches, in shuffled order), mask [n, length] (1 = masked,
        in the original order) and ids_restore [n, length] (unshuffles the decoder's sequence).
    """
    keep = max(1, int(length * (1 - mask_ratio)))
    if noise is None:
        noise = torch.rand(n, length, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)  # small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


class MAE(nn.Module):
    """A ViT encoder that sees only the visible patches + a light Transformer decoder that
    reconstructs every patch; the loss is on the masked ones (`methods.losses.mae_loss`).

    Args:
        encoder: a ViT from `methods.encoders.build_encoder` ("vit_tiny" / "vit_small" /
            "vit_base" or a "timm:" ViT); its unmasked forward is the registered encoder.
        mask_ratio: share of the patches hidden per sample (paper: 0.75).
        decoder_dim: the decoder's width (paper: 512).
        decoder_depth: its Transformer blocks (paper: 8).
        decoder_heads: its attention heads (paper: 16).
        norm_pix: per-patch normalised pixel targets (paper: yes, `--norm_pix_loss`).

    Views: the training loop's two views are two samples each (the loss is the mean over the 2n
    images); MAE needs one view per image, so both are used rather than one thrown away. Its
    augmentation is the paper's (crop 0.2-1 and flip, preset "mae").

    Departures from models_mae.py: the encoder's position embedding is timm's learned one (the
    reference fixes a sin-cos one; timm's can be interpolated to any grid), the decoder's is the
    reference's sin-cos, computed for each input's grid, so any size that is a multiple of the
    patch works; the decoder blocks are timm's `Block` (the same pre-norm block the reference
    imports from timm).
    """

    augment_preset = "mae"
    sync_batchnorm = False  # no BatchNorm: a ViT's LayerNorm is per sample, and so is the loss

    def __init__(self, encoder: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix: bool = True) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block, VisionTransformer

        vit = getattr(encoder, "model", None)
        if not isinstance(vit, VisionTransformer):
            raise ValueError("MAE needs a ViT encoder (vit_tiny, vit_small, vit_base or a timm: ViT), "
                             f"got {type(vit or encoder).__name__}")
        self.encoder = encoder
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
        self.patch_size = int(vit.patch_embed.patch_size[0])
        embed_dim = int(vit.embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)  # models_mae.py initialize_weights
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):  # xavier_uniform, zero bias, as models_mae.py `_init_weights`
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_encoder(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """The ViT on the visible patches: latent [B, prefix + keep, D], mask [B, L], ids_restore, grid."""
        vit = self.encoder.model
        x = vit.patch_embed(images)  # [B, h, w, D] (dynamic_img_size) or [B, L, D]
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(vit.patch_embed.grid_size)
        x = vit._pos_embed(x)  # [B, prefix + L, D]: class token, position embedding (interpolated)
        prefix = vit.num_prefix_tokens
        ids_keep, mask, ids_restore = random_masking(x.size(0), x.size(1) - prefix, self.mask_ratio, x.device)
        patches = torch.gather(x[:, prefix:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.size(2)))
        x = torch.cat([x[:, :prefix], patches], dim=1)  # [B, prefix + keep, D]
        x = vit.norm(vit.blocks(vit.norm_pre(x)))
        return x, mask, ids_restore, (int(grid[0]), int(grid[1]))

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor, grid: tuple[int, int]) -> Tensor:
        """models_mae.py `forward_decoder`: mask tokens in, unshuffle, sin-cos positions, blocks -> [B, L, p*p*3]."""
        prefix = self.encoder.model.num_prefix_tokens
        x = self.decoder_embed(latent)  # [B, prefix + keep, Dd]
        length = ids_restore.size(1)
        mask_tokens = self.mask_token.expand(x.size(0), length - (x.size(1) - prefix), -1)
        x_ = torch.cat([x[:, prefix:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.size(2)))  # unshuffle
        pos = sincos_pos_embed(x.size(2), *grid, device=x.device).to(x.dtype)  # [L, Dd]
        x = torch.cat([x[:, :prefix], x_ + pos], dim=1)  # the class token's position is zero
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, prefix:]  # [B, L, p*p*3]

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """x1, x2: [n, 3, H, W], H and W multiples of the patch. Returns the loss + diagnostics."""
        n = x1.size(0)
        images = torch.cat([x1, x2])  # [2n, 3, H, W]
        latent, mask, ids_restore, grid = self.forward_encoder(images)
        pred = self.forward_decoder(latent, ids_restore, grid)
        wide = torch.promote_types(pred.dtype, torch.float32)  # the loss in float32 under bf16 autocast
        loss = mae_loss(pred.to(wide), patchify(images, self.patch_size).to(wide), mask.to(wide), norm_pix=self.norm_pix)
        cls = latent[:, 0]  # diagnostics: the two views' class tokens (of the visible patches)
        return {"loss": loss, **embedding_diagnostics(cls[:n], cls[n:])}

