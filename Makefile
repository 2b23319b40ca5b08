# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# A GPU user installs their own torch build first (see README) and sets TORCH_SPEC accordingly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_out
# DeepSpeed JIT-builds a small op on the first launch; keep its cache with this checkout's venv so that
# other checkouts (and a build interrupted elsewhere, which leaves a lock behind) never block ours.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: venv demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt  # extras (nnunetv2's torchvision) must not replace torch
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test,bench]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	OMP_NUM_THREADS=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh $(DEMO_OUT)

test: venv cluster-deps
	OMP_NUM_THREADS=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT)

# sshd, pdsh and ip for the simulated two-node cluster of the multi-node tests (Debian/Ubuntu); `make test`
# runs it first. Installs only what is missing, so it costs nothing once they are there.
.PHONY: cluster-deps
cluster-deps:
	@if [ -x /usr/sbin/sshd ] && command -v pdsh >/dev/null && command -v ip >/dev/null; then \
		echo "cluster-deps: openssh-server, pdsh and iproute2 are installed"; \
	else \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server pdsh iproute2; \
	fi
