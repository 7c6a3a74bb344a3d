# hongbao — the two commands a new machine needs are `make smoke` and `make test`.
# Both create the virtualenv on first use from the project's own requirements files.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: smoke test lint bench bench-server bench-scale venv clean
.PHONY: monitor-install monitor-up monitor-down monitor-status report

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

## The main job: one machine, embedded defaults (server, 3 simulated hosts, phases, envelopes).
## With the monitor stack up (make monitor-up) the run also sends its metrics there.
smoke: $(STAMP)
	env $$($(PY) -m monitor.stack env) $(PY) -m app.smoke $(ARGS)

## The test suite (what .ci/run calls).
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-server: $(STAMP)
	$(PY) -m app.bench server $(ARGS)

bench-scale: $(STAMP)
	$(PY) -m app.bench scale $(ARGS)

clean:
	rm -rf $(VENV) runs var .pytest_cache .ruff_cache

## The metrics stack: statsd -> carbon/whisper -> graphite-web on 127.0.0.1 (README "Monitoring").
monitor-install: $(STAMP)
	$(PY) -m monitor.stack install

monitor-up: $(STAMP)
	$(PY) -m monitor.stack up

monitor-down: $(STAMP)
	$(PY) -m monitor.stack down

monitor-status: $(STAMP)
	$(PY) -m monitor.stack status

## Graphs of a run: make report ARGS="--run runs/<timestamp>"
report: $(STAMP)
	$(PY) -m monitor.report $(ARGS)
