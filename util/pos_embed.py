"""Fixed 2-D sin-cos position embeddings (MAE) and their resizing (timm's)."""
import numpy as np
from timm.layers import resample_abs_pos_embed


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
    """Resize a (1, extra + g*g, D) position embedding to new_grid x new_grid as MAE
    does (bicubic, no antialiasing, extra tokens kept): timm's resample_abs_pos_embed,
    after checking that the old grid is square (one clear error otherwise)."""
    grid_tokens = pos_embed.shape[1] - num_extra_tokens
    if int(round(grid_tokens ** 0.5)) ** 2 != grid_tokens:
        raise ValueError(f"position embedding with {grid_tokens} tokens is not a square grid")
    return resample_abs_pos_embed(pos_embed, [new_grid, new_grid], num_prefix_tokens=num_extra_tokens,
                                  interpolation="bicubic", antialias=False)
