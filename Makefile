# helios-jax: `make demo` and `make test` work on a fresh machine with only python3.12 present.
VENV := .venv
PY := $(VENV)/bin/python
# python3.12 may be a pyenv shim that refuses when 3.12 is not the active version: try candidates.
PYTHON312 := $(shell for p in python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
# loadfile: a file's tests share one worker, so module fixtures (subprocess runs) happen once.
PYTEST_ARGS ?= -q -n 2 --dist loadfile

.PHONY: demo test install install-test bench clean

$(PY):
	@test -n "$(PYTHON312)" || { echo "make: python3.12 not found (JAX >= 0.11 needs Python 3.12)" >&2; exit 2; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Two chunks of text-to-video from small random components (no weights needed): demo.mp4.
demo: install
	$(VENV)/bin/helios-jax generate --model tiny-random --prompt "a red car drives along a coastal road" \
		--num-frames 66 --out demo.mp4

# The web demo's test needs Debian's chromium: installed here when missing and possible, else the
# reason is written for that test to skip with.
test: install-test
	bash tools/install_browser.sh $(VENV)/.browser-missing
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: install
	$(PY) bench/transformer.py --config tiny --latent-size 9,16,16

clean:
	rm -rf $(VENV) build *.egg-info
