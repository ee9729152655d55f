"""One supervised epoch (linear probe or fine-tuning) and the val evaluation.

Per step: (mixup/cutmix) -> forward under autocast -> loss in float32. Backward,
accumulation, gradient clipping, the lr schedule (times each group's lr_scale
for layer-wise decay), the NaN check and mid-epoch checkpoints are
util.train_loop's, shared with pretraining.
"""
from util.amp import autocast
from util.train_loop import train_steps


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, scaler, args,
                    mixup_fn=None, clip_grad=None, log_writer=None, start_step=0, save_fn=None):
    def step_fn(samples, targets):
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with autocast(device, args.amp):
            outputs = model(samples)
        return criterion(outputs.float(), targets), {}

    return train_steps(model, data_loader, optimizer, scaler, device, epoch, args, step_fn,
                       log_writer, start_step, save_fn, clip_grad)
