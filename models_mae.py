"""Masked autoencoder with a ViT backbone (He et al., 2022), built on timm's layers.

One image's path: pixels -> patch_embed (conv p x p) -> + fixed sin-cos position
embedding -> random_masking keeps int(L * (1 - mask_ratio)) patches per sample ->
encoder blocks on the visible patches and the cls token -> norm -> decoder_embed ->
mask tokens appended and unshuffled to the original order -> + decoder position
embedding -> decoder blocks -> decoder_pred (p*p*3 pixels per patch) -> mean
squared error on the masked patches only.

The encoder's cls feature also feeds (a) the U-MAE / M-MAE regulariser in the
engine and (b) an online linear classifier on the *detached* feature, so its
gradient never reaches the encoder. Parameter names and shapes equal the
official MAE model's, so its released weights load; the online head has its own
prefix (`online_head.`).
"""
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from util.pos_embed import get_2d_sincos_pos_embed


class MAEOutput(NamedTuple):
    loss: torch.Tensor      # reconstruction loss: MSE on the masked patches
    pred: torch.Tensor      # (N, L, p*p*3) predicted patches
    mask: torch.Tensor      # (N, L), 1 = removed
    features: torch.Tensor  # (N, D) pooled encoder features, for the regulariser
    logits: torch.Tensor    # (N, classes) online head on the detached features


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False,
                 nb_classes=1000, global_pool=False, decoder_mlp_ratio=None):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"input size {img_size} is not divisible by patch size {patch_size}")
        self.patch_size, self.in_chans = patch_size, in_chans
        self.norm_pix_loss, self.global_pool = norm_pix_loss, global_pool

        # Encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # Decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio or mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        # Online linear probe on detached features (monitoring only).
        self.online_head = nn.Linear(embed_dim, nb_classes)
        self.initialize_weights()

    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches**0.5)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        # patch_embed like nn.Linear (xavier on the flattened kernel), as in MAE
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)
        # small head init, as MAE's linear probe: start from near-uniform predictions
        nn.init.normal_(self.online_head.weight, std=0.01)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ---- pixels <-> patches -------------------------------------------------
    def patchify(self, imgs):
        """(N, C, H, W) -> (N, L, p*p*C), patch pixels in (p, p, C) order as in MAE."""
        p, c = self.patch_size, self.in_chans
        n, _, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x):
        """(N, L, p*p*C) -> (N, C, H, W) for a square grid."""
        p, c = self.patch_size, self.in_chans
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1], "unpatchify needs a square patch grid"
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # ---- masking -------------------------------------------------------------
    @staticmethod
    def random_masking(x, mask_ratio, noise=None):
        """Keep the int(L * (1 - mask_ratio)) patches with the smallest noise, per sample.

        Returns the kept tokens, the binary mask in the original order (1 = removed)
        and ids_restore, which unshuffles a (kept + mask tokens) sequence. With mask_ratio 0
        and no noise the patches keep their order and no random number is drawn: evaluating
        unmasked images (online head, monitors) leaves the training run's RNG stream alone.
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None and len_keep == length:
            noise = torch.arange(length, device=x.device, dtype=torch.float32).expand(n, length)
        elif noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    # ---- encoder / decoder ---------------------------------------------------
    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def pooled_features(self, latent, global_pool=None):
        """The feature the regulariser and the online head see: the cls token (or the
        mean of the visible patch tokens with global_pool) through the encoder's
        final norm once more, as in the published U-MAE / M-MAE code.
        `global_pool` None means the model's own setting."""
        global_pool = self.global_pool if global_pool is None else global_pool
        pooled = latent[:, 1:].mean(dim=1) if global_pool else latent[:, 0]
        return self.norm(pooled)

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        n_mask = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], n_mask, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over the masked patches (in float32)."""
        dtype = torch.promote_types(pred.dtype, torch.float32)  # at least float32, float64 kept
        target = self.patchify(imgs).to(dtype)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred.to(dtype) - target).pow(2).mean(dim=-1)
        # mask_ratio 0 leaves nothing to reconstruct: the loss is then 0, not NaN.
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """MAEOutput: loss, pred, mask (MAE's tuple), then the pooled features for the
        regulariser and the online head's logits on the detached features."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        features = self.pooled_features(latent)
        logits = self.online_head(features.detach())
        return MAEOutput(loss, pred, mask, features, logits)

    @torch.no_grad()
    def online_predict(self, imgs):
        """Online head's logits on the full image (mask_ratio 0, no decoder)."""
        latent, _, _ = self.forward_encoder(imgs, 0.0)
        return self.online_head(self.pooled_features(latent))


def _mae(embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads, patch_size,
         overrides):
    """A registry size; any keyword in `overrides` (patch_size, depth, decoder_depth, ...) replaces it."""
    cfg = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
               decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, patch_size=patch_size,
               mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(overrides)
    if cfg["decoder_embed_dim"] % cfg["decoder_num_heads"]:
        raise ValueError(f"decoder width {cfg['decoder_embed_dim']} is not divisible by its "
                         f"{cfg['decoder_num_heads']} heads")
    return MaskedAutoencoderViT(**cfg)


# Registry functions. The official names and sizes, plus small ones for CPU and
# small images. Keywords (img_size, patch_size, depth, decoder_depth, ...) override.
def mae_vit_tiny_patch16(**kwargs):
    return _mae(192, 12, 3, 128, 4, 4, 16, kwargs)


def mae_vit_small_patch16(**kwargs):
    return _mae(384, 12, 6, 256, 4, 8, 16, kwargs)


def mae_vit_base_patch16(**kwargs):
    return _mae(768, 12, 12, 512, 8, 16, 16, kwargs)


def mae_vit_large_patch16(**kwargs):
    return _mae(1024, 24, 16, 512, 8, 16, 16, kwargs)


def mae_vit_huge_patch14(**kwargs):
    return _mae(1280, 32, 16, 512, 8, 16, 14, kwargs)


MODELS = {f.__name__: f for f in (mae_vit_tiny_patch16, mae_vit_small_patch16, mae_vit_base_patch16,
                                  mae_vit_large_patch16, mae_vit_huge_patch14)}

# Aliases kept from the official code.
mae_vit_base = mae_vit_base_patch16
mae_vit_large = mae_vit_large_patch16
mae_vit_huge = mae_vit_huge_patch14
