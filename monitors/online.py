"""The online linear head of a pretraining run, evaluated on full (unmasked) val images."""
import torch

from engine_finetune import evaluate


class OnlineProbe(torch.nn.Module):
    """The online head on full images (mask ratio 0, no decoder), as a classifier."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae

    def forward(self, imgs):
        return self.mae.online_predict(imgs)


def evaluate_online(model, data_loader, device, args):
    """Online head's top-1/top-5 on the val split, exact over any number of ranks
    (engine_finetune.evaluate). Pass the model without DDP."""
    return evaluate(OnlineProbe(model), data_loader, device, args)
