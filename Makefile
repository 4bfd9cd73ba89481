# Every target bootstraps .venv itself (Python 3.11 + pip), so `make test` works on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all test test-unit lint types proto proto-check demo bench clean image image-base image-tools image-clean

all: test

# Debian packages the tests and the lab use (installed only when missing, and only as root).
# podman, runc and debootstrap: `make image` and tests/e2e/test_container.py.
IMAGE_DEB_PACKAGES := podman runc debootstrap
# Go, golang-jwt and grpc-go from Debian: interop/go/ checks NSM's tokens and mTLS against them.
GO_DEB_PACKAGES := golang-go golang-github-golang-jwt-jwt-dev golang-google-grpc-dev
DEB_PACKAGES := iproute2 iputils-ping $(IMAGE_DEB_PACKAGES) $(GO_DEB_PACKAGES)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (the project needs Python 3.11)"; exit 1; }
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "note: missing Debian packages:$$missing (root tests need them)"; fi; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[lab,test,dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests tools benchmarks interop
	$(BIN)/ruff format --check proxy tests tools benchmarks interop

types: $(STAMP)
	$(BIN)/mypy

# Everything this machine can run: lint, types, unit, integration and e2e (root needed for the last two).
test: lint types
	$(BIN)/pytest

# The unit tests alone: no root, no network namespaces.
test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

# Regenerate proxy/api/ from proto/ (tests/unit/test_api_generated.py checks they agree).
proto: $(STAMP)
	$(BIN)/python tools/genproto.py

# The lab up (network namespaces: root), traffic over the LBs, one LB stopped and back, down.
demo: $(STAMP)
	@[ "$$(id -u)" = 0 ] || { echo "make demo needs root (it makes network namespaces)"; exit 1; }
	$(BIN)/meridio-proxy lab demo

# Figures, not pass/fail (root: throw-away network namespaces). See benchmarks/README.md.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.reconcile
	$(BIN)/python -m benchmarks.failover
	$(BIN)/python -m benchmarks.security

# -- the container image (container/, docs/operations.md) ----------------------------------------
# `make image` builds $(IMAGE) with podman, without any image registry: the base is a Debian
# bookworm root made here with debootstrap (container/make-base) and imported once; it is kept
# (build/image/base.tar and the podman image) so later builds only redo what changed. The build
# context holds wheels only (runtime dependencies pinned by constraints.txt, the project's wheel,
# pip for the build), installed with --no-index in a build without network.
VERSION       := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' proxy/__init__.py)
IMAGE         ?= localhost/meridio-proxy:$(VERSION)
LOCAL_BASE    := localhost/meridio-proxy-base:bookworm
BASE_IMAGE    ?= $(LOCAL_BASE)
DEBIAN_MIRROR ?= http://deb.debian.org/debian
IMAGE_PIP     := pip==26.3
IMAGE_LABEL   := org.opencontainers.image.title=meridio-proxy
IMAGE_BUILD   := build/image
CONTEXT       := $(IMAGE_BUILD)/context
# podman 4.3 on this kind of machine needs runc, cgroupfs and no default ulimits (container/containers.conf).
PODMAN        := CONTAINERS_CONF=$(CURDIR)/container/containers.conf podman

image-tools:
	@missing=""; for p in $(IMAGE_DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "error: make image needs the Debian packages$$missing (and root)"; exit 1; fi; fi

# The base: imported from build/image/base.tar, which is made once (about 30 s plus the download).
image-base: image-tools
	@if [ "$(BASE_IMAGE)" != "$(LOCAL_BASE)" ]; then echo "base image $(BASE_IMAGE): podman fetches it"; \
	elif $(PODMAN) image exists $(BASE_IMAGE); then echo "base image $(BASE_IMAGE): present"; \
	else mkdir -p $(IMAGE_BUILD); \
	  [ -f $(IMAGE_BUILD)/base.tar ] || container/make-base $(IMAGE_BUILD)/base.tar $(DEBIAN_MIRROR) || exit 1; \
	  $(PODMAN) import --quiet --message "debootstrap bookworm minbase + python3.11 (container/make-base)" \
	    $(IMAGE_BUILD)/base.tar $(BASE_IMAGE) >/dev/null && echo "base image $(BASE_IMAGE): imported"; fi

# Runtime dependencies as wheels, exactly constraints.txt's versions, and pip to install them.
$(CONTEXT)/.deps: pyproject.toml constraints.txt | $(STAMP)
	rm -rf $(CONTEXT)/wheels/deps $(CONTEXT)/wheels/pip
	mkdir -p $(CONTEXT)/wheels/deps $(CONTEXT)/wheels/pip
	$(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
	  > $(IMAGE_BUILD)/requirements.txt
	$(BIN)/pip download -q --disable-pip-version-check --only-binary :all: -c constraints.txt \
	  -r $(IMAGE_BUILD)/requirements.txt -d $(CONTEXT)/wheels/deps
	$(BIN)/pip download -q --disable-pip-version-check --no-deps $(IMAGE_PIP) -d $(IMAGE_BUILD)
	cp $(IMAGE_BUILD)/pip-$(subst pip==,,$(IMAGE_PIP))-*.whl $(CONTEXT)/wheels/pip/pip.whl
	touch $@

image: image-base $(CONTEXT)/.deps
	rm -rf $(CONTEXT)/wheels/project
	$(BIN)/pip wheel -q --disable-pip-version-check --no-deps -w $(CONTEXT)/wheels/project .
	cp container/entrypoint $(CONTEXT)/entrypoint
	$(PODMAN) build --network none --layers -f container/Containerfile -t $(IMAGE) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(VERSION) \
	  --build-arg REVISION=$$(git describe --always --dirty 2>/dev/null || echo unknown) \
	  --build-arg SOURCE=$$(git config --get remote.origin.url || echo unknown) \
	  --build-arg DEPS_DIGEST=$$(cat $(CONTEXT)/wheels/deps/*.whl $(CONTEXT)/wheels/pip/pip.whl | sha256sum | cut -c1-16) \
	  --build-arg WHEEL_DIGEST=$$(cat $(CONTEXT)/wheels/project/*.whl | sha256sum | cut -c1-16) \
	  $(CONTEXT)
	@$(PODMAN) image prune --force --filter label=$(IMAGE_LABEL) >/dev/null  # earlier builds' steps
	@echo "image $(IMAGE): $$($(PODMAN) image inspect --format '{{.Size}}' $(IMAGE) | numfmt --to=si)B"

# Forget the image, the base and the build directory (the next `make image` starts from debootstrap).
image-clean:
	-$(PODMAN) rmi --force $(IMAGE) >/dev/null 2>&1
	-$(PODMAN) image prune --force --filter label=$(IMAGE_LABEL) >/dev/null
	-$(PODMAN) rmi --force $(LOCAL_BASE) >/dev/null 2>&1
	rm -rf $(IMAGE_BUILD)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
