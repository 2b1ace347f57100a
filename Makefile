# The two commands of the README.  Each creates or refreshes .venv and installs
# what it needs (PyPI only; no GPU or other internet access required).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo evaluate-demo test notebooks test-notebooks paper venv clean

# the nightly full run on other data: make demo PARAMS=notebooks/full.yaml
demo: $(STAMP)  ## the main job: the guided tour (notebooks 01-05) end to end with papermill, demo set
	$(VENV)/bin/remap notebooks $(if $(PARAMS),-p $(PARAMS))

notebooks: demo

evaluate-demo: $(STAMP)  ## the five methods + colour histogram on the demo set, table and pictures
	$(VENV)/bin/remap demo

test-notebooks: $(STAMP)  ## only nbval (lax) over the notebooks in quick mode
	$(PY) -m pytest -q --nbval-lax notebooks/ -p no:cacheprovider

test: $(STAMP)  ## the test suite: unit tests, the real-browser test, nbval (lax) over the notebooks
	bash .ci/ensure_chromium
	$(PY) -m pytest -q --nbval-lax tests notebooks

paper: $(STAMP)  ## the paper's experiments on ../shared/data (docs/RESULTS.md); about an hour on 2 CPUs
	PY=$(PY) bash benchmarks/run_paper.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
