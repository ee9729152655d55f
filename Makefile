# `make demo` and `make test` set up .venv from requirements.txt on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= output_demo

.PHONY: venv demo test clean

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

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_OUT)
