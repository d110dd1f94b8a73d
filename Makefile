# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test coverage test-matrix soak lint typecheck check clean \
	bench-docs bench-recorded bench-warm bench-draws bench-held-out \
	bench-screen screen-out screen-recorded screen-warm

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: the whole local stack (private server, mock Node API, simulator, 2 replicas, live view)
## (ARGS: options of `provisioner dev`, e.g. ARGS="--mock-options '--latency 3'")
ARGS ?=
run: $(STAMP)
	$(BIN)/provisioner dev $(ARGS)

## test: the whole test suite against private servers, on TEST_WORKERS pytest-xdist workers
## (2; each starts its own server; TEST_WORKERS=0 runs in this process, one test at a time)
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS)
test: $(STAMP)
	$(PYTEST)

## coverage: the suite under coverage.py, lines and branches, in every Python process the
## tests start too (replicas, mock, simulator); the table, then htmlcov/index.html
coverage: $(STAMP)
	rm -rf .coverage .coverage.* htmlcov
	$(BIN)/coverage run -m pytest -q -n $(TEST_WORKERS)
	$(BIN)/coverage combine -q
	$(BIN)/coverage report
	$(BIN)/coverage html -q

## test-matrix: the tests that talk to the server under test (marked `engine`: the scripts, the
## replicas, the CLI against a pool), without the multi-process ones, against every server
## engine on this machine (ENGINES=--others: all but the one `make test` uses, as .ci/run does
## after it). The rest would run as `make test` ran them, on its engine or none
ENGINES ?= --list
test-matrix: $(STAMP)
	@engines="$$($(BIN)/python -m provisioner.redis_server $(ENGINES))"; \
	[ -n "$$engines" ] || echo "== no other server engine on this machine"; \
	for engine in $$engines; do \
		echo "== $$($$engine --version)"; \
		PROVISIONER_TEST_REDIS_BINARY=$$engine $(PYTEST) -m "engine and not e2e" || exit 1; \
	done

## soak: the local stack under steady traffic for SOAK_MINUTES (90), sampled every minute;
## then again for 45 minutes with a replica killed and started again every 45 s. Each exits 1
## on a stopped process, a broken invariant, a traceback, or a node the API and the pool
## disagree on past reconciliation; the growth it prints is for reading
SOAK_MINUTES ?= 90
SOAK := $(BIN)/provisioner bench soak --arrival-rate 100 --session 60
soak: $(STAMP)
	$(SOAK) --minutes $(SOAK_MINUTES) --every 60
	$(SOAK) --minutes 45 --every 30 --kill-every 45 --seed 2

# The benchmark's committed results (docs/bench), each from one `bench suite`; every figure
# the README quotes from them is rerun by these targets. Deterministic: the same code writes the
# same scores (only the wall-clock column moves), so after a change of the scripts or of the
# replay all of them are rerun, not the recorded replays alone: dd8b9ee moved only the warm
# suite's (users back after the first play), and that went unseen for a day. Every suite is a
# target of its own, writing its own folder, so `make -j2 bench-docs` runs them two at a time.
# A variant of the service is screened on all of them the same way, into another folder: `make
# -j2 bench-docs BENCH_SET=overdue_boots=1 BENCH_OUT=/tmp/screen` (BENCH_SET: NAME=VALUE
# settings, `--set`).
SCENARIOS ?= ../shared/scenarios
BENCH_OUT ?= docs/bench
BENCH_SET ?=
BOOT_OFFSETS ?= 997 1994
HELD_OUT_SEEDS ?= 1 2 3 4 5 6 7 11 12 13 14 15 21 22 23 24 25 41 42 43 44 45 51 52 53 54 55
SUITE := $(BIN)/provisioner bench suite $(foreach s,$(BENCH_SET),--set $(s))
DRAWS := $(addprefix bench-draw-,$(BOOT_OFFSETS))
HELD_OUT := $(addprefix bench-held-out-seed,$(HELD_OUT_SEEDS))
LATER_OUT ?= docs/later-shapes
LATER_SEEDS ?= 1 2 3 4 5 6 7 8
LATER := $(addprefix bench-later-seed,$(LATER_SEEDS))

## bench-docs: rerun every suite of docs/bench, then judge the bar (`make -j2 bench-docs` runs
## two suites at a time: the held-out seeds alone took 47 minutes so on two cores)
bench-docs: bench-recorded bench-warm bench-draws bench-held-out
	$(BIN)/provisioner bench bar $(BENCH_OUT) $(BENCH_OUT)/warm \
		$(foreach k,$(BOOT_OFFSETS),$(BENCH_OUT)/draw-$(k)) \
		$(foreach n,$(HELD_OUT_SEEDS),$(BENCH_OUT)/held-out-seed$(n))

## bench-recorded: every policy on every recorded trace, cold
bench-recorded: $(STAMP)
	$(SUITE) $(SCENARIOS) --out $(BENCH_OUT)

## bench-warm: static-best, the service and the rate oracle at 0.5 (a reference), each trace
## played once unscored first
bench-warm: $(STAMP)
	$(SUITE) $(SCENARIOS) --policy static-best --policy provisioner --policy rate-oracle-0.5 \
		--warm-up 1 --out $(BENCH_OUT)/warm

## bench-draws: the recorded traces on other draws of their boot delays (bench-draw-K: one),
## with static-best, the service and the rate oracle at 0.5
bench-draws: $(DRAWS)
$(DRAWS): bench-draw-%: $(STAMP)
	$(SUITE) $(SCENARIOS) --policy static-best --policy provisioner --policy rate-oracle-0.5 \
		--boot-offset $* --out $(BENCH_OUT)/draw-$*

## bench-held-out: generated traces of other shapes, one folder per seed (bench-held-out-seedN:
## one), each with static-best, the service and the rate oracle at 0.5 (a reference)
bench-held-out: $(HELD_OUT)
# held_out SEED, SUITE COMMAND: the suite on the seed's generated traces, in a folder of its own
held_out = @traces="$$(mktemp -d)"; trap 'rm -rf "$$traces"' EXIT; \
	$(BIN)/provisioner bench generate "$$traces" --seed $(1) > /dev/null && \
	$(2) "$$traces" --out $(BENCH_OUT)/held-out-seed$(1)
$(HELD_OUT): bench-held-out-seed%: $(STAMP)
	$(call held_out,$*,$(SUITE) --policy static-best --policy provisioner --policy rate-oracle-0.5)

## bench-later: the shapes written after the defaults were last chosen (`bench generate
## --family later`), one folder per seed under LATER_OUT, as bench-held-out, then the bar;
## kept out of docs/bench, whose figures the README quotes as they were judged
bench-later: $(LATER)
	$(BIN)/provisioner bench bar -r $(LATER_OUT)
$(LATER): bench-later-seed%: $(STAMP)
	@traces="$$(mktemp -d)"; trap 'rm -rf "$$traces"' EXIT; \
	$(BIN)/provisioner bench generate "$$traces" --family later --seed $* > /dev/null && \
	$(SUITE) "$$traces" --policy static-best --policy provisioner --policy rate-oracle-0.5 \
		--out $(LATER_OUT)/seed$*
.PHONY: bench-later $(LATER)

## bench-screen: a variant of the service screened on every suite of bench-docs in 33-38
## minutes on two cores, against 57: the service alone (`make -j2 bench-screen
## BENCH_SET=NAME=VALUE BENCH_OUT=DIR`), judged against docs/bench's static-best rows, then
## paired with docs/bench's service rows
SCREEN := $(SUITE) --policy provisioner
SCREEN_DRAWS := $(addprefix screen-draw-,$(BOOT_OFFSETS))
SCREEN_HELD_OUT := $(addprefix screen-held-out-seed,$(HELD_OUT_SEEDS))
bench-screen: screen-recorded screen-warm $(SCREEN_DRAWS) $(SCREEN_HELD_OUT)
	$(BIN)/provisioner bench bar -r $(BENCH_OUT) --static-from docs/bench
	$(BIN)/provisioner bench compare docs/bench $(BENCH_OUT)
screen-out:
	@docs="$$(realpath -m docs/bench)"; \
	case "$$(realpath -m $(BENCH_OUT))" in "$$docs" | "$$docs"/*) \
		echo "bench-screen writes the service's rows alone: give BENCH_OUT=DIR, not docs/bench" >&2; \
		exit 2;; esac
screen-recorded: $(STAMP) screen-out
	$(SCREEN) $(SCENARIOS) --out $(BENCH_OUT)
screen-warm: $(STAMP) screen-out
	$(SCREEN) $(SCENARIOS) --warm-up 1 --out $(BENCH_OUT)/warm
$(SCREEN_DRAWS): screen-draw-%: $(STAMP) screen-out
	$(SCREEN) $(SCENARIOS) --boot-offset $* --out $(BENCH_OUT)/draw-$*
$(SCREEN_HELD_OUT): screen-held-out-seed%: $(STAMP) screen-out
	$(call held_out,$*,$(SCREEN))
# After their lists are defined: a .PHONY line expands them where it stands, and above they
# were empty, so a file named bench-held-out-seed1 made that suite "up to date"
.PHONY: $(DRAWS) $(HELD_OUT) $(SCREEN_DRAWS) $(SCREEN_HELD_OUT)

lint: $(STAMP)
	$(BIN)/ruff check provisioner tests

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov
