"""Weights between this codebase's state dicts and other formats, both ways.

timm: models_mae and models_vit are built from timm's PatchEmbed and Block with timm's
names, so a timm ViT state dict is our encoder as it is; only the parts timm has no
place for (decoder, mask token, online head) are left out, and back in they are absent.

Hugging Face ViTMAE: one table (`hf_table`) of our key -> HF key, read left to right
on export and right to left on import; the one special case is MAE's fused qkv
weight, which HF holds as separate query/key/value. HF names are those of the Hub's
files (`facebook/vit-mae-*`), which transformers 4.x and 5.x both load.

Torch only: transformers and safetensors stay out of training (main_export.py reads
and writes the files). `pretraining_weights` is the one use in training: what
main_pretrain --resume does with a weights-only checkpoint (an official MAE
`*_full.pth`, or one written by main_export.py --import_from).
"""
import torch

from util.errors import UserError

# Parts of a pretraining model that a ViT encoder (timm's, HF's ViTModel) does not hold.
PRETRAIN_ONLY = ("decoder_", "mask_token", "online_head.")

# One transformer block, our module -> HF module (encoder and decoder blocks alike).
BLOCK = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense",
         "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
ENCODER = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
DECODER = {"decoder_embed": "decoder.decoder_embed", "mask_token": "decoder.mask_token",
           "decoder_pos_embed": "decoder.decoder_pos_embed", "decoder_norm": "decoder.decoder_norm",
           "decoder_pred": "decoder.decoder_pred"}
TENSORS = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed")  # parameters, not modules
# transformers 5.x's save_pretrained writes the decoder layers under this name (its
# load-time renaming undone once too often); 5.x reads both, 4.x only the Hub's.
HF5_DECODER_LAYERS = ("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")


def hf_table(depth, decoder_depth, prefix="vit."):
    """{our key: HF key, or the (query, key, value) keys for a fused qkv}. `prefix`
    is 'vit.' in ViTMAEForPreTraining, '' in ViTMAEModel / ViTModel (encoder only,
    decoder_depth 0)."""
    table = {}

    def add(ours, theirs):
        if ours in TENSORS:
            table[ours] = theirs
        else:
            for p in ("weight", "bias"):
                table[f"{ours}.{p}"] = f"{theirs}.{p}"

    def add_block(ours, theirs):
        for o, t in BLOCK.items():
            add(f"{ours}.{o}", f"{theirs}.{t}")
        for p in ("weight", "bias"):
            table[f"{ours}.attn.qkv.{p}"] = tuple(f"{theirs}.{q}.{p}" for q in QKV)

    for o, t in ENCODER.items():
        add(o, prefix + t)
    for i in range(depth):
        add_block(f"blocks.{i}", f"{prefix}encoder.layer.{i}")
    if decoder_depth:
        for o, t in DECODER.items():
            add(o, t)
        for i in range(decoder_depth):
            add_block(f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}")
    return table


def to_hf(sd, table):
    """Our state dict (exactly the table's keys) -> HF state dict."""
    _same_keys(set(sd), set(table), "our checkpoint", "the HF layout")
    out = {}
    for ours, theirs in table.items():
        if isinstance(theirs, tuple):
            out.update(zip(theirs, sd[ours].chunk(3, dim=0)))
        else:
            out[theirs] = sd[ours]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf_sd, table):
    """HF state dict (exactly the table's HF keys) -> our state dict."""
    hf_sd = {normalize_hf_key(k): v for k, v in hf_sd.items()}
    wanted = {k for t in table.values() for k in (t if isinstance(t, tuple) else (t,))}
    _same_keys(set(hf_sd), wanted, "the HF weights", "the ViTMAE layout")
    return {ours: torch.cat([hf_sd[k] for k in theirs]) if isinstance(theirs, tuple) else hf_sd[theirs]
            for ours, theirs in table.items()}


def normalize_hf_key(key):
    old, new = HF5_DECODER_LAYERS
    return new + key[len(old):] if key.startswith(old) else key


def _same_keys(have, want, what, target):
    """A strict load: every key used, none missing."""
    if have != want:
        extra, missing = sorted(have - want), sorted(want - have)
        raise UserError(f"{what} do not fit {target}: unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}, "
                        f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")


def describe(sd):
    """The shape of the ViT in a state dict of our (= timm's) names: encoder width, depth,
    patch size, patch grid side, MLP width, and the decoder's width, depth and MLP width (0 if absent)."""
    if not isinstance(sd, dict) or not torch.is_tensor(sd.get("patch_embed.proj.weight")):
        hf = isinstance(sd, dict) and any("embeddings.patch_embeddings" in k for k in sd)
        raise UserError("holds no ViT encoder (no patch_embed.proj.weight)" +
                        ("; its names are Hugging Face's: import the folder that holds it and its config.json"
                         if hf else ""))
    w = sd["patch_embed.proj.weight"]
    n_pos = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else 0
    grid = round(n_pos ** 0.5)
    if grid * grid != n_pos:
        raise UserError(f"has {n_pos} position embeddings (besides cls), not a square patch grid")
    dec = sd.get("decoder_embed.weight")
    return dict(embed_dim=w.shape[0], depth=_count(sd, "blocks."), patch_size=w.shape[-1], grid=grid,
                mlp_dim=_rows(sd, "blocks.0.mlp.fc1.weight"),
                decoder_embed_dim=dec.shape[0] if dec is not None else 0,
                decoder_depth=_count(sd, "decoder_blocks."),
                decoder_mlp_dim=_rows(sd, "decoder_blocks.0.mlp.fc1.weight"))


def _rows(sd, key):
    return sd[key].shape[0] if key in sd else 0


def _count(sd, prefix):
    return 1 + max((int(k.split(".")[1]) for k in sd if k.startswith(prefix)), default=-1)


def pretraining_weights(model, sd, path):
    """A weights-only checkpoint for main_pretrain --resume (official MAE `*_full.pth`:
    encoder + decoder, no online head; or an import). With a decoder, the model's own
    new online head is added (said). An encoder-only file cannot continue pretraining:
    one line naming --finetune. A model without a decoder (eval_setup's ViT) takes
    `sd` as it is."""
    own = model.state_dict()
    if "decoder_embed.weight" not in own:
        return sd
    if not any(k.startswith("decoder_") for k in sd):
        raise UserError(f"checkpoint {path} holds an encoder only (no decoder), so pretraining cannot "
                        "continue from it: use it with --finetune (main_finetune.py / main_linprobe.py) "
                        "or main_analyze.py")
    head = {k: v for k, v in own.items() if k.startswith("online_head.")}
    if head and not any(k in sd for k in head):
        print(f"{path} has no online head: a new one starts ({own['online_head.weight'].shape[0]} classes)")
        sd = {**sd, **head}
    return sd
