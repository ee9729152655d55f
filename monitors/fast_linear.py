"""Fast linear evaluation on frozen features, for small studies.

NOT the MAE linear-probe protocol (90 epochs of LARS with augmentation and a
BatchNorm before the head): the features are extracted once, without
augmentation, standardised with the train statistics, and two classifiers are fit:
- closed-form ridge regression onto one-hot targets,
- multinomial logistic regression, full-batch L-BFGS,
each with its weight decay chosen on a held-out part of train, then refit on all
of train. On 50k x 192 features this takes about a minute on a CPU.
"""
import torch
import torch.nn.functional as F

LABEL = "fast linear (frozen features, not the 90-epoch LARS protocol)"
RIDGE_LAMBDAS = (1e-1, 1e1, 1e3)      # in units of the number of train rows' mean diagonal
LOGREG_DECAYS = (1e-4, 1e-3, 1e-2)


def _accuracy(logits, y):
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == y[:, None]
    return 100 * hit[:, 0].float().mean().item(), 100 * hit.any(1).float().mean().item()


def standardize(train, *others):
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_ridge(x, y, nb_classes, lam):
    """argmin_W ||[x 1] W - onehot(y)||^2 + lam * n * ||W||^2 (bias not penalised)."""
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1).double()
    t = F.one_hot(y, nb_classes).double()
    reg = torch.eye(x.shape[1], dtype=x.dtype, device=x.device) * lam * x.shape[0] / x.shape[1]
    reg[-1, -1] = 0
    w = torch.linalg.solve(x.T @ x + reg, x.T @ t)
    return lambda z: torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], 1).double() @ w


def fit_logreg(x, y, nb_classes, weight_decay, steps=200):
    """Multinomial logistic regression, mean cross-entropy + wd/2 ||W||^2, full-batch L-BFGS."""
    # zero start, no random init: nothing drawn from (or reseeded in) the global generators
    lin = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], nb_classes, device=x.device)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 0.5 * weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    lin.requires_grad_(False)
    return lin


def _split(n, holdout, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_hold = max(1, int(n * holdout))
    return perm[n_hold:], perm[:n_hold]


def _select(fit, values, x, y, nb_classes, holdout):
    """The value with the best held-out top-1 (ties: the first), and all the scores."""
    tr, ho = _split(x.shape[0], holdout)
    tr, ho = tr.to(x.device), ho.to(x.device)
    scores = {v: _accuracy(fit(x[tr], y[tr], nb_classes, v)(x[ho]), y[ho])[0] for v in values}
    return max(values, key=lambda v: scores[v]), scores


@torch.no_grad()
def fast_linear_eval(train_x, train_y, val_x, val_y, nb_classes, holdout=0.1, steps=200,
                     ridge_lambdas=RIDGE_LAMBDAS, decays=LOGREG_DECAYS, methods=("logreg", "ridge")):
    """Fit on (train_x, train_y), report top-1/top-5 (%) on val for each method."""
    train_x, val_x = standardize(train_x.float(), val_x.float())
    train_y, val_y = train_y.long(), val_y.long()
    out = {"label": LABEL, "n_train": train_x.shape[0], "n_val": val_x.shape[0]}
    if "ridge" in methods:
        lam, scores = _select(fit_ridge, ridge_lambdas, train_x, train_y, nb_classes, holdout)
        acc1, acc5 = _accuracy(fit_ridge(train_x, train_y, nb_classes, lam)(val_x), val_y)
        out["ridge"] = {"acc1": acc1, "acc5": acc5, "lambda": lam, "holdout_acc1": scores}
    if "logreg" in methods:
        def fit(x, y, c, wd):
            return fit_logreg(x, y, c, wd, steps)
        wd, scores = _select(fit, decays, train_x, train_y, nb_classes, holdout)
        acc1, acc5 = _accuracy(fit(train_x, train_y, nb_classes, wd)(val_x), val_y)
        out["logreg"] = {"acc1": acc1, "acc5": acc5, "weight_decay": wd, "holdout_acc1": scores}
    best = out.get("logreg") or out["ridge"]
    out["acc1"], out["acc5"] = best["acc1"], best["acc5"]
    return out
