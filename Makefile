# Two commands on a fresh machine: `make run` (set up + default job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup run test lint bench bench-optim bench-refresh bench-head bench-dist cpu-bench cl-bench gpu-check soak clean

setup: $(STAMP)

# torch goes in first and pinned: anything that admits a newer torch would pull the CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m llm_pretrain.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Throughput of llama_20m on the shared C4 sample (docs/benchmarks.md); slow, not part of tests.
SHARED ?= ../shared/data
BENCH_20M := model=llama_20m data=files data.path=$(SHARED)/c4/c4_en_sample_2000.jsonl.gz \
	data.tokenizer=$(SHARED)/t5_tokenizer/spiece.model trainer.max_steps=40 trainer.warmup_steps=4 \
	trainer.eval_every=0 trainer.eval_at_start=false eval.tokens=20000 trainer.log_every=10
bench: $(STAMP)
	$(PY) -m llm_pretrain.train $(BENCH_20M) data.layout=paper hydra.run.dir=outputs/bench/llama_20m_paper
	$(PY) -m llm_pretrain.train $(BENCH_20M) data.layout=packed hydra.run.dir=outputs/bench/llama_20m_packed

# Optimizer step cost on llama_60m shapes vs torch AdamW and the reference packages, the step-time
# tail of synchronous vs staggered refreshes over 400 steps (refresh every 200 and 50 steps), then
# every registered method's state memory and step cost on the whole llama_60m.
bench-optim: $(STAMP)
	$(PY) benchmarks/optimizer_step.py $(ARGS)
	$(PY) benchmarks/optimizer_step.py --family projection $(ARGS)
	$(PY) benchmarks/optimizer_step.py --family refresh --gap 200
	$(PY) benchmarks/optimizer_step.py --family refresh --gap 50
	$(PY) benchmarks/registry_table.py
	$(PY) benchmarks/rso_memory.py

# Forward + backward of llama_20m (batch 8 x 256) with the dense head against the chunked one
# (model.loss_impl) at several chunk sizes, and the activations each saves (docs/benchmarks.md).
bench-head: $(STAMP)
	$(PY) benchmarks/head_loss.py $(ARGS)

# Final loss with synchronous vs staggered subspace refreshes: GaLore on the default job (llama_tiny,
# built-in corpus), 300 steps, refresh every 50, seeds 0 and 1 (docs/optimizers.md; ~5 minutes).
bench-refresh: $(STAMP)
	$(PY) benchmarks/refresh_loss.py $(ARGS)

# Step time and bytes communicated per step, DDP against FSDP2, on 2 CPU ranks
# (docs/benchmarks.md); slow, not part of tests.
bench-dist: $(STAMP)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/distributed_step.py $(ARGS)

# The GPU check (llm_pretrain/gpu_check.py): kernels on CUDA, flash-attn, 30-step bf16 runs of
# llama_60m and llama_350m with 10 methods, compile, the chunked head and activation checkpointing;
# at most 8 minutes on one H100/H200, written to docs/gpu.md. Without CUDA: the dry run on CPU.
gpu-check: $(STAMP)
	$(PY) -m llm_pretrain.gpu_check $(ARGS)

# The CPU benchmark protocol (llm_pretrain/cpu_bench.py, docs/benchmarks.md): every pretraining
# method at 3+ lrs on a log grid around its config's, 2 seeds at its best, on the built-in corpus
# and the C4 sample, 300 steps of llama_tiny each (about 3 hours on 2 cores); resumable: run it
# again after a stop and it runs only the missing jobs. Then the report (best lr per method,
# seed spreads, ties, ranks per corpus, the ranking along the way).
CPU_BENCH_DIR ?= outputs/sweeps/cpu_bench
cpu-bench: $(STAMP)
	$(PY) -m llm_pretrain.cpu_bench --out $(CPU_BENCH_DIR) $(ARGS)

# Continual learning on CPU (docs/benchmarks.md): llama_20m pretrained on the C4 sample (600
# steps, about 15 minutes, once: kept in $(CL_BENCH_DIR)/base), then experiment=cl_bench (order 1
# scaled down) for each method from it, then the report (AA, BWT, state, tokens/s, heatmaps).
CL_BENCH_DIR ?= outputs/cl_bench
CL_METHODS ?= adamw,galore,gorp,welore,gradnorm_lorp,owlore,lisa
CL_BASE := model=llama_20m data=files data.path=$(SHARED)/c4/c4_en_sample_2000.jsonl.gz \
	data.tokenizer=$(SHARED)/t5_tokenizer/spiece.model data.layout=packed data.seq_len=256 \
	trainer.max_steps=600 trainer.global_batch_size=16 trainer.micro_batch_size=16 \
	trainer.warmup_steps=30 trainer.lr=3e-3 trainer.eval_every=200 trainer.eval_at_start=false \
	eval.tokens=20000 trainer.log_every=50 trainer.progress=false checkpoint.at_end=true
cl-bench: $(STAMP)
	test -f $(CL_BENCH_DIR)/base/checkpoints/step_00000600.pt || \
		$(PY) -m llm_pretrain.train $(CL_BASE) hydra.run.dir=$(CL_BENCH_DIR)/base
	$(PY) -m llm_pretrain.train -m experiment=cl_bench optimizer=$(CL_METHODS) \
		trainer.init_from=$(CL_BENCH_DIR)/base hydra.sweep.dir=$(CL_BENCH_DIR)/sweep $(ARGS)
	$(PY) -m llm_pretrain.report $(CL_BENCH_DIR)/sweep

# Fault injection (docs/reliability.md): kill -9, SIGTERM and a file-size limit against real
# runs on the built-in corpus and the C4 sample, each resumed and compared bit for bit with an
# uninterrupted run; SOAK_MINUTES of trials after one of each kind.
SOAK_MINUTES ?= 15
soak: $(STAMP)
	$(PY) tests/soak.py --minutes $(SOAK_MINUTES) --json outputs/soak.json

clean:
	rm -rf outputs multirun .pytest_cache
