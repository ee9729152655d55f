# `make demo` and `make test` set up .venv from requirements.txt on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= output_demo

.PHONY: venv demo test test-cluster clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# A short M-MAE pretraining of a ViT-Tiny-width model on the built-in synthetic
# images (32x32, 4x4 patches): a few minutes on a 2-core CPU. Leaves log.txt,
# TensorBoard events, checkpoints and reconstruction pictures in $(DEMO_OUT).
demo: venv
	$(PY) main_pretrain.py --model mae_vit_tiny_patch16 --input_size 32 --patch_size 4 \
		--batch_size 64 --synthetic_size 2048 --epochs 6 --warmup_epochs 1 --blr 1e-3 \
		--norm_pix_loss --reg tcr --lamb 0.01 --val_interval 2 --vis_every 2 --save_every 2 \
		--num_workers 2 --print_freq 8 --output_dir $(DEMO_OUT)
	@echo "demo outputs in $(DEMO_OUT): tensorboard --logdir $(DEMO_OUT)"

# tests/cluster/ needs SLURM and minutes of its own: `make test-cluster` runs it.
test: venv
	$(PY) -m pytest -q tests --ignore=tests/cluster

# A cluster of separate hosts on this machine (a network + UTS namespace each, one shared
# file system; needs root): a real SLURM cluster (munged and slurmctld on host ctl, a slurmd
# on each of node1-3) and torchrun across hosts, all started and removed by the tests.
# install.sh brings slurm-wlm and munge from Debian (root or sudo; skipped when present).
test-cluster: venv
	bash tests/cluster/install.sh
	$(PY) -m pytest -q tests/cluster

clean:
	rm -rf $(VENV) $(DEMO_OUT)
