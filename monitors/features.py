"""Encoder features of unmasked images, for every monitor (diagnostics, kNN, fast linear)."""
import torch

from util.amp import autocast


@torch.no_grad()
def encode(model, imgs, amp="none", pools=(None,)):
    """Pooled encoder features of unmasked images, one (n, d) tensor per entry of `pools`
    (global_pool values: False = cls, True = mean patch token, None = the model's own),
    from one encoder pass; a lone pool gives the tensor itself. Mask ratio 0 keeps the patch
    order and draws no random number, so monitoring does not change a training run."""
    with autocast(imgs.device, amp):
        latent, _, _ = model.forward_encoder(imgs, 0.0)
        out = [model.pooled_features(latent, p).float() for p in pools]
    return out[0] if len(out) == 1 else out


@torch.no_grad()
def extract_features(model, loader, device, amp="none", pools=(None,)):
    """(features (n, d) float32, labels (n,)) of a loader's shard, unmasked, on `device`.
    With several `pools` (see encode) the features are a list, one per pool."""
    was_training = model.training
    model.eval()
    feats, labels = [[] for _ in pools], []
    for imgs, target in loader:
        out = encode(model, imgs.to(device, non_blocking=True), amp, pools)
        for f, o in zip(feats, out if len(pools) > 1 else [out]):
            f.append(o)
        labels.append(torch.as_tensor(target).to(device))
    model.train(was_training)
    d = model.norm.normalized_shape[0]
    feats = [torch.cat(f) if f else torch.zeros(0, d, device=device) for f in feats]
    labels = torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long, device=device)
    return (feats if len(pools) > 1 else feats[0]), labels
