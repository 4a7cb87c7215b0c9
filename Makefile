# Two commands do everything: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: demo test test-all test-e2e browser bench bench-integrity prefect-ui mlflow-ui fleet-up fleet-down fleet-status lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: set up, build the reference model, run the optimize flow on it for the intel-cpu profile
demo: $(STAMP)
	$(BIN)/edgeopt zoo build
	$(BIN)/edgeopt optimize .edgeopt/zoo/digits-resnet/model.onnx --profile intel-cpu \
		--calibration .edgeopt/zoo/digits-resnet/calibration.npz --eval .edgeopt/zoo/digits-resnet/eval.npz

## test: the default suite (slow tests included; `heavy` ones, which would push CI past its budget, left out),
## then, in a session of its own, the fleet's end-to-end tests, smoke and heavy nightly ones on one fleet
## (tests/e2e: a real PostgreSQL-backed Prefect server, MLflow server and worker; the nightly deployment,
## a worker killed mid-run, automations, the UIs in Chromium; ~10 min at load 5-8), bounded by E2E_BUDGET seconds
## (SIGINT: pytest stops and its fixtures stop the fleet). CI (.ci/run) runs this.
E2E_BUDGET ?= 2400
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not heavy" --ignore=tests/e2e --durations=25
	timeout --signal=INT --kill-after=300 $(E2E_BUDGET) $(BIN)/python -m pytest -q tests/e2e --durations=15

## test-all: every test, the heavy ones too (MiniLM's checkpoint through every encoder route: ~8 min)
test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q

## test-e2e: the fleet's end-to-end tests alone (what `make test` runs after the default suite)
test-e2e: $(STAMP) browser
	timeout --signal=INT --kill-after=300 $(E2E_BUDGET) $(BIN)/python -m pytest -q tests/e2e --durations=0

## browser: headless Chromium for the certification report's browser test (Debian's package, when root)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || \
		echo "chromium is not installed: the certification report's browser test will be skipped"

## bench: the performance report (benchmarks/README.md)
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_optimize.py

## bench-integrity: like-for-like ratios with intervals, steady/peak memory, verdicts of 3 re-measured demo runs
bench-integrity: $(STAMP)
	$(BIN)/python benchmarks/bench_integrity.py

## prefect-ui: the Prefect UI on the local store (http://127.0.0.1:4200)
prefect-ui: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.edgeopt/prefect $(BIN)/prefect server start

## mlflow-ui: the MLflow UI on the local store (http://127.0.0.1:5000)
mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.edgeopt/mlflow/mlflow.db \
		--default-artifact-root $(CURDIR)/.edgeopt/mlflow/artifacts

## fleet-up: a local fleet under .edgeopt/fleet (PostgreSQL, Prefect server on it, MLflow server, pools,
## deployments, a worker per pool this host fits); prints the export line; idempotent (deployments/fleet.sh)
fleet-up: $(STAMP)
	$(BIN)/edgeopt zoo build
	bash deployments/fleet.sh up

## fleet-down: stop the local fleet (workers first, then the servers, then PostgreSQL); its data stays
fleet-down:
	bash deployments/fleet.sh down

fleet-status:
	bash deployments/fleet.sh status

lint: $(STAMP)
	$(BIN)/ruff check edgeopt tasks flows tests benchmarks

clean:
	rm -rf .edgeopt
