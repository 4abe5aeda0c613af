# wdiff: the two commands a newcomer needs are `make demo` and `make test`; both set up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian libraries Open3D 0.20 needs to import (libusb) and to render headless on the CPU (Mesa);
# chromium + chromium-driver: the tests open scene.html in a real headless browser (selenium);
# xvfb: they open the `wdiff view` window on a virtual display.
DEB_PKGS := libusb-1.0-0 libvulkan1 mesa-vulkan-drivers libegl1 libgl1 libgomp1 chromium chromium-driver xvfb

.PHONY: setup demo test test-all lint samples bench clean

# Blender (bpy) and MeshLab (pymeshlab) open the PLY files in the tests, each in its own process, from
# a venv of their own: bpy 5.0 pins numpy 1.26, which wdiff's venv does not use.
VENV3D  := .venv-3d
STAMP3D := $(VENV3D)/.installed
TOOLS3D := "bpy>=5.0,<5.1" "pymeshlab>=2025.7"

setup: $(STAMP) $(STAMP3D)

$(STAMP3D):
	$(PYTHON) -m venv $(VENV3D)
	$(VENV3D)/bin/python -m pip install -q $(TOOLS3D)
	@touch $(STAMP3D)

$(STAMP): pyproject.toml
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/wdiff run sample_checkpoints/digits-gpt2 -o out/demo --frames --mesh --views oblique,back

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

lint: setup
	$(VENV)/bin/ruff check wdiff tests

clean:
	rm -rf out .pytest_cache
