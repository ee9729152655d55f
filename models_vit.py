"""ViT classifier for evaluating a pretrained encoder: linear probe and fine-tuning.

timm's VisionTransformer set up as MAE's models_vit. With `global_pool` the
classifier sees the mean of the patch tokens through a new LayerNorm (`fc_norm`)
and the encoder's final `norm` is not used; otherwise it sees the cls token after
`norm`. Parameter names and shapes equal the encoder part of models_mae and of
the official MAE checkpoints, so `load_pretrained` only has to drop the decoder,
the online head and (with global pooling) `norm`, and resize the position
embedding when the patch grid differs.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from util.checkpoint import load_checkpoint
from util.errors import UserError
from util.pos_embed import interpolate_pos_embed

# Pretraining-only parameters: the decoder, its mask token and the online probe.
PRETRAIN_ONLY = ("decoder_", "mask_token", "online_head.")


class VisionTransformer(TimmVisionTransformer):
    def __init__(self, global_pool=True, **kwargs):
        super().__init__(global_pool="avg" if global_pool else "token", **kwargs)
        self.use_global_pool = global_pool
        self.encoder_frozen = False

    def group_matcher(self, coarse=False):
        """Layer ids for layer-wise lr decay as in MAE (used by timm's
        param_groups_layer_decay): embeddings 0, block i -> i + 1, and everything
        after the blocks (norm, fc_norm, head) in the top layer with scale 1.
        timm's own matcher puts `norm` with the last block (scale = decay)."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=r"^blocks\.(\d+)")

    def freeze_encoder(self):
        """Linear probe: only `head` trains. The encoder stays in eval mode and runs
        without autograd, so its weights cannot change and no activations are kept."""
        for name, p in self.named_parameters():
            p.requires_grad = name.startswith("head.")
        self.encoder_frozen = True
        return self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if self.encoder_frozen:
            for name, module in self.named_children():
                if name != "head":
                    module.eval()
        return self

    def forward(self, x):
        if not self.encoder_frozen:
            return super().forward(x)
        with torch.no_grad():
            features = self.forward_head(self.forward_features(x), pre_logits=True)
        return self.head(features)


def _vit(embed_dim, depth, num_heads, patch_size, overrides):
    """A registry size; keywords in `overrides` (img_size, patch_size, depth, ...) replace it."""
    cfg = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size, mlp_ratio=4,
               qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(overrides)
    if cfg.get("img_size", 224) % cfg["patch_size"] != 0:
        raise UserError(f"input size {cfg.get('img_size', 224)} is not divisible by patch size {cfg['patch_size']}")
    return VisionTransformer(**cfg)


# Same encoder sizes as models_mae's mae_vit_* (tiny and small for CPU and small
# images). Keywords: img_size, patch_size, depth, num_classes, global_pool, drop_path_rate.
def vit_tiny_patch16(**kwargs):
    return _vit(192, 12, 3, 16, kwargs)


def vit_small_patch16(**kwargs):
    return _vit(384, 12, 6, 16, kwargs)


def vit_base_patch16(**kwargs):
    return _vit(768, 12, 12, 16, kwargs)


def vit_large_patch16(**kwargs):
    return _vit(1024, 24, 16, 16, kwargs)


def vit_huge_patch14(**kwargs):
    return _vit(1280, 32, 16, 14, kwargs)


MODELS = {f.__name__: f for f in (vit_tiny_patch16, vit_small_patch16, vit_base_patch16,
                                  vit_large_patch16, vit_huge_patch14)}


# ---- loading a pretrained encoder ----------------------------------------------
def _describe(state_dict):
    """(width, depth, patch size) of the encoder in a state dict."""
    w = state_dict["patch_embed.proj.weight"]
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    return w.shape[0], depth, w.shape[-1]


def _check_size(model, state_dict, path, model_name, pretrained_as):
    """One clear line when the checkpoint holds an encoder of another size."""
    if "patch_embed.proj.weight" not in state_dict:
        raise UserError(f"checkpoint {path} holds no ViT encoder (no patch_embed.proj.weight)")
    ours = model.state_dict()
    theirs = _describe(state_dict)
    mine = (model.embed_dim, len(model.blocks), model.patch_embed.patch_size[0])
    bad = [k for k, v in state_dict.items()
           if k in ours and k != "pos_embed" and v.shape != ours[k].shape]
    if theirs != mine or bad:
        hint = f" (pretrained as {pretrained_as})" if pretrained_as else ""
        raise UserError(f"checkpoint {path}{hint} holds a {theirs[0]}-d, {theirs[1]}-block encoder with "
                        f"patch size {theirs[2]}; --model {model_name} is {mine[0]}-d with {mine[1]} "
                        f"blocks and patch size {mine[2]}")


def load_pretrained(model, path, model_name=""):
    """Load the encoder of a pretraining checkpoint into `model`, as MAE's
    main_finetune: ours ({'model', 'args', ...} from util.checkpoint.save_training)
    or an official MAE file ({'model': encoder weights}). Only head.* (and, with
    global pooling, fc_norm.*) may be left missing. Returns (missing, dropped)."""
    state = load_checkpoint(path)
    sd = state.get("model") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint {path} has no 'model' entry with a state dict")
    args = state.get("args") if isinstance(state.get("args"), dict) else {}
    dropped = sorted(k for k in sd if k.startswith(PRETRAIN_ONLY))
    sd = {k: v for k, v in sd.items() if not k.startswith(PRETRAIN_ONLY)}
    own = model.state_dict()
    for k in ("head.weight", "head.bias"):  # a classifier for other classes (MAE drops it too)
        if k in sd and sd[k].shape != own[k].shape:
            del sd[k]
            dropped.append(k)
    if model.use_global_pool:  # MAE: the final norm is unused with global pooling
        dropped += [k for k in ("norm.weight", "norm.bias") if sd.pop(k, None) is not None]
    _check_size(model, sd, path, model_name, args.get("model"))
    if "pos_embed" in sd:
        try:
            sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], model.patch_embed.grid_size[0])
        except ValueError as e:
            raise UserError(f"checkpoint {path}: {e}") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = {"head.weight", "head.bias"}
    if model.use_global_pool:
        allowed |= {"fc_norm.weight", "fc_norm.bias"}
    if set(missing) - allowed or unexpected:
        raise UserError(f"checkpoint {path} does not fit --model {model_name}: missing "
                        f"{sorted(set(missing) - allowed)[:4]}, unexpected {sorted(unexpected)[:4]}")
    return sorted(missing), dropped
