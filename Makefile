# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: demo test venv latex clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade "pip>=23" "setuptools>=64,<81" wheel
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[test]"
	touch $(STAMP)

# Ends with the compact leaderboard (ranked per model, robust vs standard gap), the paths of
# the full tables (Markdown, LaTeX, CSV) and of the tradeoff figure.
demo: $(STAMP)
	$(VENV)/bin/oodbench run configs/experiments/digits.yaml
	@echo "tradeoff figure (near-OOD FPR@95 against AUROC per method, marker by family):"
	@$(VENV)/bin/oodbench plot tradeoff configs/experiments/digits.yaml

# The LaTeX tests compile tables with a real pdflatex: Debian's texlive (booktabs is in
# texlive-latex-recommended, graphicx in texlive-latex-base), installed once when missing.
latex:
	@command -v pdflatex >/dev/null 2>&1 || { \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    texlive-latex-base texlive-latex-recommended; }

# The HTML page test (tests/test_html_report.py) opens the page in Debian's chromium, which it
# installs itself when missing and run as root (and otherwise fails saying how to install it).
test: $(STAMP) latex
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) results .oodbench_cache
