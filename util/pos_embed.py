"""Fixed 2-D sin-cos position embeddings (MAE) and their interpolation."""
import numpy as np
import torch
import torch.nn.functional as F


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """embed_dim: output dimension per position; pos: positions, any shape -> (M, D)."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Returns (grid_size*grid_size [+1], embed_dim), row-major like MAE's, with a
    zero row first for the cls token when asked."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in MAE
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def interpolate_pos_embed(pos_embed, new_grid, num_extra_tokens=1):
    """Bicubically resize a (1, extra + g*g, D) position embedding to new_grid x new_grid.

    Extra tokens (cls) are kept as they are. Returns the input unchanged when the
    grid already matches.
    """
    extra, grid_tokens = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    old_grid = int(round(grid_tokens.shape[1] ** 0.5))
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise ValueError(f"position embedding with {grid_tokens.shape[1]} tokens is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid_tokens.shape[-1]
    grid_tokens = grid_tokens.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid_tokens = F.interpolate(grid_tokens.float(), size=(new_grid, new_grid), mode="bicubic",
                                align_corners=False)
    grid_tokens = grid_tokens.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)
    return torch.cat([extra, grid_tokens.to(pos_embed.dtype)], dim=1)
