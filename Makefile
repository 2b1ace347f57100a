# The two commands of the README.  Each creates or refreshes .venv and installs
# what it needs (PyPI only; no GPU or other internet access required).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test notebooks test-notebooks venv clean

demo: $(STAMP)  ## the main job
	$(VENV)/bin/remap demo

notebooks: $(STAMP)  ## the guided tour, run end to end by papermill (quick mode, demo set)
	$(VENV)/bin/remap notebooks

test-notebooks: $(STAMP)  ## nbval (lax) over the notebooks in quick mode
	$(PY) -m pytest -q --nbval-lax notebooks/ -p no:cacheprovider

test: $(STAMP)  ## the test suite
	$(PY) -m pytest -q

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
