# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,torch,tf,image,batch,queue,serve,dev

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

# Converts the bundled example (examples/tiny_cnn.py, built in code) with a parity check, then inspects it.
demo: install
	mkdir -p demo-out
	$(VENV)/bin/mpack convert examples.tiny_cnn:make_model --input pixels:batch,3,32,32:float32 -o demo-out/tiny_cnn.onnx
	$(VENV)/bin/mpack inspect demo-out/tiny_cnn.onnx

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# A private Docker engine plus the local base image local/debian-py:bookworm, for `mpack build-image` and its tests
# (apt-installs docker.io and debootstrap when missing; root). Use it with: export DOCKER_HOST="$$(make -s engine)"
.PHONY: engine engine-stop
engine:
	@scripts/docker-engine.sh up

engine-stop:
	@scripts/docker-engine.sh stop

clean:
	rm -rf $(VENV) demo-out fixtures/build .pytest_cache
