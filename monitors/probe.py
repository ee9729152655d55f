"""--probe_data monitors: a small labelled set beside the (possibly unlabeled) pretraining data.

Every eval epoch the encoder (eval mode, mask ratio 0) gives the features of the probe's
train and val splits once, and two classifiers are scored on its val split:
- weighted kNN (monitors.knn), its train split the bank;
- a linear classifier trained from scratch on the detached train features, as the online
  head is but on labelled data the pretraining corpus may not have: standardised features
  (the train split's mean/std, like main_linprobe's affine-free BatchNorm, so one lr suits
  every epoch's feature scale), Adam, LINEAR_EPOCHS passes of shuffled mini-batches, the
  initial weights and every pass's order from a generator seeded by --seed alone.
  The same fit every epoch for the same features: numbers compare across epochs.

Neither changes the run: the features are computed without gradient, the classifier is
not part of the model, and the CPU generator is restored (a DataLoader iterator draws its
base seed from it). On several ranks every rank holds the whole (small) train split's
features in dataset order and fits the same classifier; the val counts are summed, so
the numbers are one process's.
"""
import torch
import torch.nn.functional as F

from monitors.features import extract_features
from monitors.knn import knn_accuracy
from util.datasets import eval_loader
from util.dist import all_gather_padded, all_reduce_sum, get_world_size

LINEAR_EPOCHS = 100  # passes over the probe's train split per eval epoch
LINEAR_BATCH = 256
LINEAR_LR = 1e-2


def shard_features(model, dataset, device, args):
    """(features, labels) of this rank's ShardSampler shard (indices rank, rank+W, ...),
    unmasked, encoder in eval mode; the global RNG left as it was (encode, eval_loader)."""
    return extract_features(model, eval_loader(dataset, args), device, args.amp)


def gather_in_order(x, n):
    """The n rows of a split in dataset order, on every rank, from each rank's shard:
    rank r's j-th row is index r + j * W."""
    world = get_world_size()
    shards = all_gather_padded(x, (n + world - 1) // world)  # (W, rows, ...), zero-padded
    return shards.transpose(0, 1).flatten(0, 1)[:n]


def fit_linear(x, y, nb_classes, seed, epochs=LINEAR_EPOCHS, batch_size=LINEAR_BATCH, lr=LINEAR_LR):
    """A linear classifier on x standardised by its own statistics; returns features -> logits.
    Its randomness (initial weights, mini-batch order) comes from a generator seeded by
    `seed` alone: the same x gives the same classifier, and the global RNG is not used."""
    mean, std = x.mean(0), x.std(0, correction=0).clamp_min(1e-6)
    x = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(nb_classes, x.shape[1], generator=g) * 0.01).to(x.device).requires_grad_()
    bias = torch.zeros(nb_classes, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=g).to(x.device).split(batch_size):
                loss = F.cross_entropy(x[idx] @ weight.T + bias, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    weight, bias = weight.detach(), bias.detach()
    return lambda z: ((z - mean) / std) @ weight.T + bias


def topk_accuracy(logits, y):
    """Top-1/top-5 (%) and n over all ranks' rows (each rank scores its own shard)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == y[:, None]
    counts = torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=y.device)])
    top1, top5, n = all_reduce_sum(counts.double()).tolist()
    return {"acc1": 100 * top1 / max(n, 1), "acc5": 100 * top5 / max(n, 1), "n": int(n)}


@torch.no_grad()
def probe_monitor(model, train, val, nb_classes, device, args):
    """kNN and linear top-1/top-5 on the probe's val split: {"knn": {...}, "linear": {...}}.
    `model` without DDP."""
    bank, bank_labels = shard_features(model, train, device, args)
    queries, labels = shard_features(model, val, device, args)
    knn = knn_accuracy(bank, bank_labels, queries, labels, nb_classes,
                       getattr(args, "knn_k", 20), getattr(args, "knn_t", 0.07))
    x, y = gather_in_order(bank, len(train)), gather_in_order(bank_labels, len(train))
    classifier = fit_linear(x, y, nb_classes, args.seed)
    return {"knn": knn, "linear": topk_accuracy(classifier(queries), labels)}
