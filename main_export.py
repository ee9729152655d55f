"""Pretrained encoders out to timm and Hugging Face, and their weights in.

    python main_export.py --checkpoint output_dir/checkpoint-199.pth --format timm --output enc.safetensors
    python main_export.py --checkpoint output_dir/checkpoint-199.pth --format hf --output mae_hf/
    python main_export.py --import_from mae_hf/ --output imported.pth      # an HF ViTMAE folder
    python main_export.py --import_from vit_mae.safetensors --output imported.pth   # a timm MAE state dict

Out (`--checkpoint`, a pretraining or fine-tuning checkpoint of this codebase, or an
official MAE file): `--format timm` writes the encoder as a timm state dict
(safetensors) and prints the timm.create_model call that loads it strictly;
`--format hf` writes a folder (config.json + model.safetensors) for
ViTMAEForPreTraining (encoder + decoder) when the checkpoint has a decoder, else for
ViTMAEModel; ViTModel loads either. In: an HF ViTMAE / ViT folder or a timm ViT state
dict becomes a weights-only checkpoint of this codebase ({'model', 'args'}) that
main_pretrain --resume (with a decoder), --finetune and main_analyze take.
Weights only; both sides are loaded strictly, so a key that does not map fails.
transformers is needed for --format hf only (the written folder is loaded back with it).
"""
import functools
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

import models_mae
import models_vit
from util.checkpoint import atomic_save, load_checkpoint
from main_linprobe import PROBE_BN_EPS
from util.cli import Parser, add_bool
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, eval_resize
from util.errors import UserError, exit_on_user_error
from util import interop


def get_args_parser():
    p = Parser("Export to timm / Hugging Face, or import from them", add_help=True)
    p.add_argument("--checkpoint", help="checkpoint to export (ours or an official MAE file)")
    p.add_argument("--format", choices=["timm", "hf"], help="export format")
    p.add_argument("--import_from", help="HF ViTMAE/ViT folder or timm state dict (.safetensors/.pth) to import")
    p.add_argument("--output", required=True, help="file (timm, import) or folder (hf) to write; must not exist")
    add_bool(p, "--norm_pix_loss", None, "for the HF config, when the checkpoint does not say (official files); "
             "with --import_from: for the args written")
    p.add_argument("--mask_ratio", default=None, type=float,
                   help="for the HF config (default: the checkpoint's; 0 for an encoder alone); with --import_from: "
                        "for the args written")
    return p


# ---- model sizes -----------------------------------------------------------------
@functools.cache
def sizes():
    """{encoder width: the registry entry of that size}, read from models_mae (built on
    the meta device: no memory, no init cost)."""
    out = {}
    with torch.device("meta"):
        for name, fn in models_mae.MODELS.items():
            m = fn()
            out[m.cls_token.shape[-1]] = dict(
                name=name, size=name.split("_")[2], depth=len(m.blocks), patch_size=m.patch_size,
                num_heads=m.blocks[0].attn.num_heads, decoder_embed_dim=m.decoder_embed.out_features,
                decoder_depth=len(m.decoder_blocks), decoder_num_heads=m.decoder_blocks[0].attn.num_heads,
                decoder_mlp_ratio=m.decoder_blocks[0].mlp.fc1.out_features / m.decoder_embed.out_features)
    return out


def registry_size(width, source):
    known = sizes()
    if width not in known:
        raise UserError(f"{source} has a {width}-wide encoder: unknown model size (known widths: "
                        + ", ".join(f"{w} {e['size']}" for w, e in sorted(known.items())) + ")")
    return known[width]


SHAPE_KEYS = ("patch_size", "depth", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio")


def overrides(shape, entry):
    """models_mae keywords (and main_pretrain flags) for a shape that differs from its registry size."""
    return {k: shape[k] for k in SHAPE_KEYS if shape.get(k) and shape[k] != entry[k]}


def with_decoder(shape, entry, heads, source):
    """`shape` (interop.describe) with the decoder's head count (from a config or saved args:
    the weights do not show it) and MLP ratio, when it has a decoder."""
    if not shape["decoder_depth"]:
        return shape
    dim, mlp = shape["decoder_embed_dim"], shape["decoder_mlp_dim"]
    heads = heads or entry["decoder_num_heads"]
    if dim % heads or int(dim * (mlp / dim)) != mlp:
        raise UserError(f"{source} has a {dim}-wide decoder with {heads} heads and MLP width {mlp}: "
                        "no model of this codebase has that shape")
    return {**shape, "decoder_num_heads": heads, "decoder_mlp_ratio": mlp / dim}


# ---- reading our checkpoints -----------------------------------------------------------
def read_ours(path):
    """(state dict, saved args, kind, shape, registry entry, class names or None); kind is
    'pretrain' (models_mae keys, decoder optional) or 'classifier' (models_vit: head / fc_norm)."""
    state = load_checkpoint(path)
    sd = state.get("model") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint {path} has no 'model' entry with a state dict: not a pretraining or "
                        "fine-tuning checkpoint")
    args = state.get("args") if isinstance(state.get("args"), dict) else {}
    sd = fold_probe_head(sd)
    try:
        shape = interop.describe(sd)
    except UserError as e:
        raise UserError(f"checkpoint {path} {e}: not a pretraining or fine-tuning checkpoint") from None
    kind = "classifier" if any(k.startswith(("head.", "fc_norm.")) for k in sd) else "pretrain"
    entry = registry_size(shape["embed_dim"], f"checkpoint {path}")
    shape = with_decoder(shape, entry, args.get("decoder_num_heads"), f"checkpoint {path}")
    if shape["mlp_dim"] != 4 * shape["embed_dim"]:
        raise UserError(f"checkpoint {path} has MLP width {shape['mlp_dim']}, not 4 x {shape['embed_dim']}: "
                        "no model of this codebase has that shape")
    _load_into_ours(sd, kind, shape, entry, path)
    return sd, args, kind, shape, entry, class_names(state, sd, kind, path)


def class_names(state, sd, kind, path):
    """A classifier's class names by head output (main_linprobe / main_finetune save their
    dataset's), or None: a checkpoint without them exports with the bare indices."""
    names = state.get("classes")
    if kind != "classifier" or names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) < len(names):
        raise UserError(f"checkpoint {path} has 'classes' that are not a list of distinct names")
    n_out = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    if len(names) != n_out:
        raise UserError(f"checkpoint {path} names {len(names)} classes but its head has {n_out} outputs")
    return names


def fold_probe_head(sd):
    """A linear probe's head (main_linprobe: head.0 BatchNorm1d without affine, head.1 Linear)
    as the one Linear it computes at evaluation: W / sqrt(var + eps) and b - W' mean."""
    if "head.0.running_var" not in sd or "head.1.weight" not in sd:
        return sd
    scale = (sd["head.0.running_var"].double() + PROBE_BN_EPS).rsqrt()
    weight = sd["head.1.weight"].double() * scale
    bias = sd["head.1.bias"].double() - weight @ sd["head.0.running_mean"].double()
    out = {k: v for k, v in sd.items() if not k.startswith("head.")}
    out["head.weight"], out["head.bias"] = weight.to(sd["head.1.weight"].dtype), bias.to(sd["head.1.bias"].dtype)
    return out


def _load_into_ours(sd, kind, shape, entry, path):
    """Strict load on our side: the checkpoint must be exactly one of our models (the
    decoder and online head may be absent in a pretraining one)."""
    img = shape["grid"] * shape["patch_size"]
    kw = {k: v for k, v in overrides(shape, entry).items() if kind == "pretrain" or k in ("patch_size", "depth")}
    with torch.device("meta"):
        if kind == "pretrain":
            head = sd.get("online_head.weight")
            model = models_mae.MODELS[entry["name"]](img_size=img, nb_classes=len(head) if head is not None else 1,
                                                     **kw)
        else:
            pool = "fc_norm.weight" in sd
            n_cls = sd["head.weight"].shape[0] if "head.weight" in sd else 0
            model = models_vit.MODELS[entry["name"][4:]](img_size=img, global_pool=pool, num_classes=n_cls, **kw)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # a shape that fits no model of this codebase
        raise UserError(f"checkpoint {path} is not a model of this codebase: {' '.join(str(e).split())[:200]}")
    optional = interop.PRETRAIN_ONLY if kind == "pretrain" else ()
    bad = [k for k in missing if not k.startswith(optional)]
    if kind == "pretrain" and shape["decoder_depth"]:
        bad += [k for k in missing if k.startswith(("decoder_", "mask_token"))]
    if bad or unexpected:
        raise UserError(f"checkpoint {path} is not a model of this codebase: missing {sorted(bad)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")


def encoder_only(sd):
    return {k: v for k, v in sd.items() if not k.startswith(interop.PRETRAIN_ONLY + ("head.",))}


def timm_weights(sd, kind):
    """The encoder, and a classifier's head (timm's names are ours)."""
    head = {k: v for k, v in sd.items() if kind == "classifier" and k.startswith("head.")}
    return {**encoder_only(sd), **head}


# ---- export ------------------------------------------------------------------------------
def timm_call(shape, entry, kind, global_pool, num_classes=0, label_names=None):
    """(timm model name, create_model keywords) for the encoder: the registry name of its
    size at 224 px, with img_size/patch_size/depth where they differ, and a classifier's
    class names as timm's pretrained_cfg label_names (m.pretrained_cfg["label_names"])."""
    name = f"vit_{entry['size']}_patch{entry['patch_size']}_224"
    kw = dict(num_classes=num_classes)
    img = shape["grid"] * shape["patch_size"]
    if img != 224:
        kw["img_size"] = img
    kw.update({k: shape[k] for k in ("patch_size", "depth") if shape[k] != entry[k]})
    kw["global_pool"] = "avg" if global_pool else "token"
    if global_pool and kind == "pretrain":
        kw["fc_norm"] = False  # pretraining keeps the final norm on every token, then pools
    kw["pretrained_cfg_overlay"] = data_config(img, kw["num_classes"])
    if label_names:
        kw["pretrained_cfg_overlay"]["label_names"] = tuple(label_names)
    return name, kw


def data_config(img, num_classes):
    """timm's preprocessing fields for our training and evaluation: without them the 224 px
    registry name's own config (augreg: mean = std = 0.5, 224 px) is what
    timm.data.resolve_model_data_config reports, and a user following it preprocesses wrongly."""
    return dict(input_size=(3, img, img), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
                crop_pct=img / eval_resize(img), crop_mode="center", num_classes=num_classes)


class _Code(str):
    """A name printed bare in the printed call (repr 'names', not "'names'")."""

    def __repr__(self):
        return str(self)


def export_timm(path, out):
    import timm
    if not out.endswith(".safetensors"):  # a .pth name would claim a torch.save file
        raise UserError(f"--format timm writes safetensors: name --output {out} *.safetensors")
    sd, args, kind, shape, entry, names = read_ours(path)
    global_pool = "fc_norm.weight" in sd if kind == "classifier" else bool(args.get("global_pool"))
    n_cls = sd["head.weight"].shape[0] if kind == "classifier" else 0
    name, kw = timm_call(shape, entry, kind, global_pool, n_cls, names)
    enc = timm_weights(sd, kind)
    model = timm.create_model(name, pretrained=False, **kw)
    try:
        model.load_state_dict(enc, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit timm's {name}({kw}): {' '.join(str(e).split())[:200]}")
    data = kw["pretrained_cfg_overlay"]
    # the names once, in their own field: 1,000 of them inside the printed call would bury it
    short = {**kw, "pretrained_cfg_overlay": {**data, **({"label_names": _Code("names")} if names else {})}}
    # the metadata's kwargs are the real ones (names included), for create_model(**json.loads(...))
    meta = {"timm_model": name, "timm_kwargs": json.dumps(kw), "source": os.path.basename(path),
            **{k: json.dumps(data[k]) for k in ("input_size", "mean", "std", "interpolation", "crop_pct")},
            **({"label_names": json.dumps(names)} if names else {})}
    _write(out, lambda tmp: save_file(enc, tmp, metadata=meta))
    args_text = ", ".join(f"{k}={v!r}" for k, v in short.items())
    what = f"the classifier ({n_cls} classes{', named in label_names' if names else ''}, " if n_cls \
        else "the encoder ("
    read_names = f'  names = tuple(json.loads(safetensors.safe_open({out!r}, "pt").metadata()["label_names"]))\n'
    print(f"wrote {what}{len(enc)} tensors) to {out}; load it (strictly) with\n"
          f"{read_names if names else ''}"
          f"  m = timm.create_model({name!r}, {args_text})\n"
          f"  m.load_state_dict(safetensors.torch.load_file({out!r}))\n"
          f"  # timm.data.resolve_model_data_config(m): {data['input_size'][1]} px, ImageNet mean/std, bicubic")
    return name, kw


def hf_config(shape, entry, decoder, norm_pix_loss, mask_ratio):
    from transformers import ViTMAEConfig
    return ViTMAEConfig(
        hidden_size=shape["embed_dim"], num_hidden_layers=shape["depth"], num_attention_heads=entry["num_heads"],
        intermediate_size=shape["mlp_dim"], hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        image_size=shape["grid"] * shape["patch_size"], patch_size=shape["patch_size"], num_channels=3,
        decoder_hidden_size=shape["decoder_embed_dim"] or entry["decoder_embed_dim"],
        decoder_num_hidden_layers=shape["decoder_depth"] or entry["decoder_depth"],
        decoder_num_attention_heads=shape.get("decoder_num_heads") or entry["decoder_num_heads"],
        decoder_intermediate_size=shape["decoder_mlp_dim"] or 4 * entry["decoder_embed_dim"],
        mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
        architectures=["ViTMAEForPreTraining" if decoder else "ViTMAEModel"])


def export_hf(path, out, norm_pix_loss=None, mask_ratio=None):
    try:
        import transformers
    except ImportError:
        raise UserError("--format hf needs transformers (pip install -r requirements.txt)") from None
    transformers.utils.logging.disable_progress_bar()
    sd, args, kind, shape, entry, names = read_ours(path)
    if "fc_norm.weight" in sd:
        raise UserError(f"checkpoint {path} was fine-tuned with --global_pool: its fc_norm on the mean patch "
                        "token has no place in HF's ViTModel / ViTMAEModel (they end in one layernorm on every "
                        "token); export it with --format timm")
    decoder = shape["decoder_depth"] > 0
    norm_pix_loss = bool(args.get("norm_pix_loss", False)) if norm_pix_loss is None else norm_pix_loss
    if mask_ratio is None:  # an encoder alone is for features: ViTMAEModel (AutoModel) then keeps every patch
        mask_ratio = float(args.get("mask_ratio", 0.75)) if decoder else 0.0
    if kind == "classifier":  # the cls token's final norm -> head, as models_vit without --global_pool
        config = hf_classifier_config(shape, entry, sd["head.weight"].shape[0], names)
        table = {**interop.hf_table(shape["depth"], 0, prefix="vit."),
                 "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
        cls = transformers.ViTForImageClassification
    else:
        config = hf_config(shape, entry, decoder, norm_pix_loss, mask_ratio)
        table = interop.hf_table(shape["depth"], shape["decoder_depth"], prefix="vit." if decoder else "")
        cls = transformers.ViTMAEForPreTraining if decoder else transformers.ViTMAEModel
    hf_sd = interop.to_hf({k: v for k, v in sd.items() if k in table}, table)

    def write(tmp):
        os.makedirs(tmp)
        config.save_pretrained(tmp)
        image_processor(config.image_size).save_pretrained(tmp)  # for AutoImageProcessor, as Hub folders
        save_file(hf_sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _, info = cls.from_pretrained(tmp, output_loading_info=True)  # the strict load on HF's side
        bad = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v}
        if bad:
            raise UserError(f"transformers {transformers.__version__} does not load the exported weights "
                            f"into {cls.__name__} exactly: {bad}")
    _write(out, write)
    dropped = sorted({k.split(".")[0] for k in sd if k not in table})
    what = (f"{config.num_labels} classes" + (", named in id2label" if names else "") if kind == "classifier"
            else f"norm_pix_loss {norm_pix_loss}, mask_ratio {mask_ratio}")
    if kind != "classifier" and args.get("global_pool"):  # HF's configs have no field for it
        print(f"note: {path} was pretrained with --global_pool: its feature is the mean of "
              "last_hidden_state[:, 1:] through the final layernorm once more, not the cls token; HF's config "
              "cannot say so (give --global_pool again to a run on an import of it)")
    features = (f"  transformers.ViTModel.from_pretrained({out!r}, add_pooling_layer=False)"
                "   # features: [cls, every patch in order]")
    print(f"wrote {cls.__name__} ({what}) to {out}"
          + (f"; left out: {', '.join(dropped)}" if dropped else "") + "; load it with\n"
          + (f"  transformers.{cls.__name__}.from_pretrained({out!r})\n" if decoder or kind == "classifier" else "")
          + (features if kind != "classifier" else "")
          + ("\n  # ViTMAEModel / AutoModel put the patch tokens in a random order (EVAL.md)" if kind != "classifier"
             else ""))
    return config


def hf_classifier_config(shape, entry, num_labels, names=None):
    """ViTForImageClassification's config; with the class names as id2label / label2id
    (pipeline("image-classification") and config.id2label then name them, not LABEL_0)."""
    from transformers import ViTConfig
    labels = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}) if names else {}
    return ViTConfig(**labels,
        hidden_size=shape["embed_dim"], num_hidden_layers=shape["depth"], num_attention_heads=entry["num_heads"],
        intermediate_size=shape["mlp_dim"], hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        image_size=shape["grid"] * shape["patch_size"], patch_size=shape["patch_size"], num_channels=3,
        num_labels=num_labels, architectures=["ViTForImageClassification"])


def image_processor(img):
    """HF's ViT preprocessing with our training mean/std: the whole image resized (bicubic) to
    img x img, scaled to [0, 1] and normalised (HF ViT's convention: no centre crop)."""
    from transformers import ViTImageProcessor
    return ViTImageProcessor(do_resize=True, size={"height": img, "width": img}, resample=3,  # PIL bicubic
                             do_rescale=True, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                             image_std=list(IMAGENET_STD))


def _write(out, write):
    """Write through a temporary path beside `out`, then rename: nothing existing is
    replaced, and a failure leaves nothing under `out`."""
    if not out.strip():
        raise UserError("--output is empty: name the file or folder to write")
    if os.path.exists(out):
        raise UserError(f"{out} already exists; choose another --output (nothing was overwritten)")
    tmp = f"{out.rstrip('/')}.tmp.{os.getpid()}"
    parent = os.path.dirname(os.path.abspath(tmp))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {out}: cannot make its folder {parent}: {e.strerror}") from None
    try:
        write(tmp)
        os.rename(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


# ---- import ------------------------------------------------------------------------------
def read_hf_folder(path):
    """(our state dict, settings for its args) from an HF ViTMAE or ViT folder."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path} is a folder without config.json: not a Hugging Face model folder")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path} is not a JSON object (a Hugging Face config is one)")
    if cfg.get("model_type") not in ("vit_mae", "vit"):
        raise UserError(f"{path} holds a {cfg.get('model_type')!r} model; only vit_mae and vit import")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size") if k not in cfg]
    if missing:
        raise UserError(f"{cfg_path} does not say {', '.join(missing)}")
    _note_preprocessing(path)
    weights = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise UserError(f"{path} has no model.safetensors or pytorch_model.bin (sharded files do not import)")
    hf_sd = load_file(weights[0]) if weights[0].endswith(".safetensors") else load_checkpoint(weights[0])
    hf_sd = {interop.normalize_hf_key(k): v for k, v in hf_sd.items()}
    prefix = "vit." if "vit.embeddings.cls_token" in hf_sd else ""
    dropped = sorted(k for k in hf_sd if k.startswith(("pooler.", "classifier.")))
    hf_sd = {k: v for k, v in hf_sd.items() if k not in dropped}
    decoder = cfg.get("decoder_num_hidden_layers", 0) if any(k.startswith("decoder.") for k in hf_sd) else 0
    _check_hf_config(cfg, path)
    sd = interop.from_hf(hf_sd, interop.hf_table(cfg["num_hidden_layers"], decoder, prefix))
    if dropped:
        print(f"left out of the import: {len(dropped)} tensors of {sorted({k.split('.')[0] for k in dropped})}")
    # HF's ViTMAEConfig defaults (mask 0.75, no norm_pix_loss) where the config does not say
    settings = dict(norm_pix_loss=bool(cfg.get("norm_pix_loss", False)), mask_ratio=float(cfg.get("mask_ratio", 0.75)))
    if decoder:  # the weights do not show it (the decoder's width, depth and MLP width they do)
        settings["decoder_num_heads"] = cfg.get("decoder_num_attention_heads", 16)
    return sd, settings


def _note_preprocessing(path):
    """This codebase normalises with ImageNet's mean/std: a folder whose processor says other
    ones (HF ViT's 0.5) was trained on other inputs, and its features here are not its own."""
    proc = os.path.join(path, "preprocessor_config.json")
    try:
        with open(proc) as f:
            cfg = json.load(f)
        mean, std = (v if isinstance(v, list) else [v] * 3 for v in (cfg["image_mean"], cfg["image_std"]))
        differs = any(abs(float(a) - b) > 1e-3 for x, y in ((mean, IMAGENET_MEAN), (std, IMAGENET_STD))
                      for a, b in zip(x, y, strict=True))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # no (readable) processor: nothing to say
        return
    if differs:
        print(f"note: {proc} normalises with mean {mean}, std {std}; fine-tuning, probing and analysis here "
              f"normalise with ImageNet's {[round(v, 3) for v in IMAGENET_MEAN]}, "
              f"{[round(v, 3) for v in IMAGENET_STD]} (the model sees other inputs than it was trained on)")


def _check_hf_config(cfg, path):
    """Settings of an HF config that models_mae cannot express. The decoder's are not among
    them: its width, depth and MLP width come from the weights and its head count from the
    config (models_mae takes each), and an encoder-only folder's config keeps HF's decoder
    defaults, which describe nothing it holds."""
    entry = registry_size(cfg.get("hidden_size"), f"{path}")
    want = dict(hidden_act="gelu", qkv_bias=True, num_channels=3, num_attention_heads=entry["num_heads"],
                intermediate_size=4 * cfg["hidden_size"])
    bad = [f"{k} {cfg.get(k, want[k])!r} (needs {v!r})" for k, v in want.items() if cfg.get(k, v) != v]
    for k in ("image_size", "patch_size"):
        if not isinstance(cfg.get(k, 0), int):
            bad.append(f"{k} {cfg[k]!r} (needs one int: square)")
    if bad:
        raise UserError(f"{path}: config has {'; '.join(bad)}: no model of this codebase has that shape")
    eps = cfg.get("layer_norm_eps", 1e-12)
    if eps != 1e-6:
        print(f"note: {path} has layer_norm_eps {eps:g}; models_mae uses MAE's 1e-6 "
              "(the outputs differ slightly: most for small activations)")


def read_timm(path):
    """Our state dict from a timm ViT (MAE) state dict: the same names."""
    if path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        state = load_checkpoint(path)
        sd = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds no state dict")
    if "fc_norm.weight" in sd:
        raise UserError(f"{path} has fc_norm (a classifier pooled with fc_norm): the pretraining model has "
                        "no place for it; import a timm MAE encoder (num_classes=0, global_pool='token')")
    dropped = sorted(k for k in sd if k.startswith("head."))
    if dropped:
        print(f"left out of the import: {', '.join(dropped)}")
    return {k: v for k, v in sd.items() if k not in dropped}


def import_weights(src, out, norm_pix_loss=None, mask_ratio=None):
    """Write the weights of an HF folder or a timm file as a checkpoint of this codebase;
    --norm_pix_loss / --mask_ratio, when given, replace what the source says (official
    and timm files say nothing)."""
    if out.endswith(".safetensors"):  # the mirror of --format timm's refusal of .pth
        raise UserError(f"an import writes a torch checkpoint: name --output {out} *.pth")
    if os.path.isdir(src):
        sd, settings = read_hf_folder(src)
    elif os.path.isfile(src):
        sd, settings = read_timm(src), dict(norm_pix_loss=False, mask_ratio=0.75)
    else:
        raise UserError(f"--import_from {src} does not exist")
    try:
        shape = interop.describe(sd)
    except UserError as e:
        raise UserError(f"{src} {e}") from None
    settings.update({k: v for k, v in dict(norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio).items()
                     if v is not None})
    entry = registry_size(shape["embed_dim"], src)
    shape = with_decoder(shape, entry, settings.pop("decoder_num_heads", None), src)
    _refuse_zero_positions(sd, src)
    _load_into_ours(sd, "pretrain", shape, entry, src)
    flags = overrides(shape, entry)
    args = dict(model=entry["name"], input_size=shape["grid"] * shape["patch_size"], patch_size=shape["patch_size"],
                global_pool=False, **{k: flags.get(k) for k in SHAPE_KEYS[1:]},
                **settings, imported_from=os.path.abspath(src))
    _write(out, lambda tmp: atomic_save({"model": sd, "args": args}, tmp))
    _print_import_use(out, entry, args, flags, decoder=shape["decoder_depth"] > 0)
    return args


def _refuse_zero_positions(sd, src):
    """Our position embeddings are the fixed sin-cos table, never trained: all-zero ones (a
    freshly built transformers 5 ViTMAE leaves them, its cls and mask tokens zero until
    from_pretrained) would pretrain and evaluate with no position information at all."""
    zero = [k for k in ("pos_embed", "decoder_pos_embed") if k in sd and not sd[k].any()]
    if zero:
        raise UserError(f"{src} has all-zero position embeddings ({', '.join(zero)}): an untrained model "
                        "(transformers 5's ViTMAEForPreTraining(config) leaves them zero); save one loaded "
                        "with from_pretrained or trained, whose position embeddings are the sin-cos table")


def _print_import_use(out, entry, args, flags, decoder):
    size = [f"--input_size {args['input_size']}"]
    vit_flags = " ".join(size + [f"--{k} {v}" for k, v in flags.items() if k in ("patch_size", "depth")])
    pretrain = " ".join([f"--model {entry['name']}"] + size + [f"--{k} {v}" for k, v in flags.items()]
                        + [f"--mask_ratio {args['mask_ratio']}"]
                        + (["--norm_pix_loss"] if args["norm_pix_loss"] else []))
    print(f"wrote {out} ({'encoder + decoder' if decoder else 'encoder only'}); use it with\n"
          + (f"  main_pretrain.py --resume {out} {pretrain} ...\n" if decoder else "")
          + f"  main_finetune.py --finetune {out} --model {entry['name'][4:]} {vit_flags} ...   (or main_linprobe.py)\n"
          + f"  main_analyze.py --checkpoint {out} ...")


@exit_on_user_error
def main(args):
    if bool(args.import_from) == bool(args.checkpoint):
        raise UserError("pass either --checkpoint (with --format timm|hf) or --import_from")
    if args.mask_ratio is not None and not 0 <= args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.import_from:
        return import_weights(args.import_from, args.output, args.norm_pix_loss, args.mask_ratio)
    if args.format is None:
        raise UserError("--checkpoint needs --format timm or --format hf")
    if args.format == "timm":
        given = [f for f in ("norm_pix_loss", "mask_ratio") if getattr(args, f) is not None]
        if given:
            raise UserError(f"--{' and --'.join(given)}: a timm file keeps only the encoder, with no place for it "
                            "(it is for --format hf and --import_from)")
        return export_timm(args.checkpoint, args.output)
    return export_hf(args.checkpoint, args.output, args.norm_pix_loss, args.mask_ratio)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
