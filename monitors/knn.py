"""Weighted k-nearest-neighbour accuracy (the DINO protocol).

Memory bank: L2-normalised features of the train split (eval transform, no
masking); queries: the val split. For each query the k most cosine-similar bank
entries vote for their class with weight exp(sim / T); top-1/top-5 of the votes.

Distributed: each rank holds its own shard of the bank and of the queries. Per
step every rank contributes one query batch; the batches are all-gathered, each
rank finds the top-k of *its* bank shard for every query, those candidates are
all-gathered and merged into the global top-k, and each rank scores its own
queries. The counts are summed, so the result equals one process holding it all.
"""
import torch
import torch.nn.functional as F

from monitors.features import extract_features
from util.datasets import build_dataset, eval_loader, eval_transform
from util.dist import all_gather_padded, all_reduce_max, all_reduce_sum, get_rank


@torch.no_grad()
def knn_accuracy(bank, bank_labels, queries, query_labels, nb_classes, k=20, temperature=0.07,
                 batch_size=128):
    """Top-1/top-5 accuracy (%) of weighted kNN; bank/queries are this rank's shards.
    Peak memory: a (batch_size * world) x (bank shard) similarity matrix, i.e.
    batch_size x the whole bank (650 MB for ImageNet-1K's 1.28M at 128)."""
    device = bank.device
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    bank_size = int(all_reduce_sum(torch.tensor([bank.shape[0]], device=device)).item())
    k_eff = min(k, bank_size)
    k_local = min(k_eff, bank.shape[0])
    steps = int(all_reduce_max(torch.tensor([(queries.shape[0] + batch_size - 1) // batch_size],
                                            device=device)).item())
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, n
    for step in range(steps):
        q = queries[step * batch_size:(step + 1) * batch_size]
        n_local = q.shape[0]
        q_all = all_gather_padded(q, batch_size).flatten(0, 1)  # (W*B, d), same on every rank
        sims = q_all @ bank.T
        # local candidates, padded with -inf where this shard holds fewer than k rows
        val = torch.full((q_all.shape[0], k_eff), -float("inf"), device=device)
        lab = torch.zeros(q_all.shape[0], k_eff, dtype=torch.long, device=device)
        if k_local > 0:
            v, i = sims.topk(k_local, dim=1)
            val[:, :k_local], lab[:, :k_local] = v, bank_labels[i]
        # merge: this rank's rows of the query batch, candidates from every rank
        rank, width = get_rank(), batch_size
        own = slice(rank * width, rank * width + n_local)
        val = all_gather_padded(val[None], 1)[:, 0, own]  # (W, n_local, k)
        lab = all_gather_padded(lab[None], 1)[:, 0, own]
        val, lab = val.permute(1, 0, 2).flatten(1), lab.permute(1, 0, 2).flatten(1)
        top_val, top_idx = val.topk(k_eff, dim=1)
        top_lab = lab.gather(1, top_idx)
        votes = torch.zeros(n_local, nb_classes, dtype=torch.float64, device=device)
        votes.scatter_add_(1, top_lab, (top_val.double() / temperature).exp())
        pred = votes.topk(min(5, nb_classes), dim=1).indices
        target = query_labels[step * batch_size:(step + 1) * batch_size]
        hit = pred == target[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(),
                               torch.tensor(n_local, device=device)]).double()
    top1, top5, n = all_reduce_sum(counts).tolist()
    return {"acc1": 100 * top1 / max(n, 1), "acc5": 100 * top5 / max(n, 1), "n": int(n), "k": k_eff}


_BANKS = {}  # the train split with eval transform, built once per run (listing ImageNet takes a while)


def knn_monitor(model, dataset_val, device, args, dataset_train=None, nb_classes=None):
    """kNN accuracy of the model: train split (eval transform) as bank, val as queries
    (another labelled set, e.g. main_pretrain's --probe_data: pass both and its nb_classes)."""
    if dataset_train is None:
        key = (args.dataset, args.data_path, args.class_subset, args.input_size, args.synthetic_size)
        if key not in _BANKS:
            _BANKS[key] = build_dataset(args, "train", eval_transform(args.input_size))
        dataset_train = _BANKS[key]
    bank, bank_labels = extract_features(model, eval_loader(dataset_train, args), device, args.amp)
    queries, labels = extract_features(model, eval_loader(dataset_val, args), device, args.amp)
    return knn_accuracy(bank, bank_labels, queries, labels, nb_classes or args.nb_classes,
                        getattr(args, "knn_k", 20), getattr(args, "knn_t", 0.07))
