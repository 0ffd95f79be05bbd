# hsiedge: every target sets itself up on a fresh machine (virtual environment, installs).
VENV     ?= .venv
PYTHON   ?= python3
PY       := $(VENV)/bin/python
TORCH    := torch==2.13.0
STAMP    := $(VENV)/.hsiedge-installed

.PHONY: setup test lint demo bench bench-accuracy bench-bad-inputs bench-export-memory bench-infer bench-infer-many bench-gpu cuda-ext clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[torch,dev,rtx,cluster]"
	$(PY) -c "from hsiedge.ops import cpu; cpu.load(); print('selective-scan CPU kernel:', cpu.library_path())"
	touch $@

setup: $(STAMP)  ## create .venv, install torch 2.13 (CPU), hsiedge with its dev tools, TensorRT for RTX and Dask

lint: setup
	$(VENV)/bin/ruff check .

test: lint  ## ruff, then the test suite (CPU; GPU tests skip with their reason)
	$(VENV)/bin/pytest

demo: setup  ## every seed model on a real scene (Jasper Ridge) from ../shared/datasets
	$(PY) -m hsiedge.demo

bench: setup  ## benchmark tables (not tests): the op at both extremes (a few minutes)
	$(PY) bench/scan_cpu.py

bench-infer: setup  ## hsiedge infer vs the best hand loop, per model, runtime and precision (~30 min; --big-gb 4.4 adds peak memory)
	$(PY) bench/infer.py

bench-infer-many: setup  ## infer-many on a local Dask cluster: 1 vs 2 workers vs one process, 24 real scenes (~5 min)
	$(PY) bench/infer_many.py --copies 4

cuda-ext: setup  ## build the CUDA selective-scan kernel for this machine's GPU (the `cuda` backend)
	$(PY) -m hsiedge.ops.cuda

bench-gpu: cuda-ext  ## the CUDA kernel at both extremes vs copy bandwidth and the torch fallback (GPU)
	$(PY) bench/scan_gpu.py

bench-accuracy: setup  ## the three models vs an RBF-SVM on Jasper Ridge, 3 seeds x 2 protocols (over an hour)
	$(PY) bench/accuracy.py

bench-bad-inputs: setup  ## a census of bad inputs (scenes, manifests, checkpoints, keys, outputs, ...): handled / tracebacks / unsafe (~5 min)
	$(PY) bench/bad_inputs.py

bench-export-memory: setup  ## peak memory and time of int8 exports, Jasper Ridge and a 1024 x 1024 scene (~15 min)
	$(PY) bench/export_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
