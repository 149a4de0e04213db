# splitlearn-studio: `make test` installs what the tests need into .venv and runs them.

PYTHON ?= python3.11
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# The install stamp records what was installed; it is rebuilt when a pin changes.
INSTALL_STAMP := $(VENV)/.installed
PIP := $(VENV_PYTHON) -m pip install --disable-pip-version-check --quiet --constraint constraints.txt

# Models and other state; the default model is prepared here once and reused.
export SPLITLEARN_DATA_DIR ?= $(CURDIR)/data
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

PYTEST_ARGS ?=

.PHONY: install browser run test proto prepare-model clean

$(VENV_PYTHON):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch resolved by another package pulls CUDA wheels.
$(INSTALL_STAMP): pyproject.toml constraints.txt | $(VENV_PYTHON)
	$(PIP) torch==2.13.0
	$(PIP) --editable ".[test]"
	@touch $@

install: $(INSTALL_STAMP)

# Regenerate splitcore/remote/proto/*_pb2*.py{,i} from trunk.proto (checked in; a test checks they are fresh).
proto: install
	$(VENV_PYTHON) -m splitcore.remote.proto.codegen

# Everything on this machine: embedded Redis, a trunk server, Celery workers and beat, daphne on :8000.
run: install
	$(VENV_PYTHON) -m webapp.launcher

prepare-model: install
	$(VENV_PYTHON) -m splitcore prepare-model

# Browser tests drive Debian's chromium, tests/test_compose.py validates docker-compose.yml with Debian's
# docker-compose (no engine needed) and tests/test_nginx_*.py run Debian's nginx binary with their own
# configuration (no daemon, no system service): each installed here when missing (needs root, as on CI
# machines). Installing the nginx package starts no service in a container without systemd (invoke-rc.d
# finds no runlevel); with systemd the unit is masked while it installs, then left disabled.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "chromium is missing and needs root to install (apt-get install chromium): browser tests will fail"
	@command -v docker-compose >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; } || \
		echo "docker-compose is missing and needs root to install (apt-get install docker-compose): tests/test_compose.py will fail"
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		{ [ ! -d /run/systemd/system ] || systemctl mask --runtime --quiet nginx; } && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null && \
		{ [ ! -d /run/systemd/system ] || \
			{ systemctl disable --quiet nginx && systemctl unmask --runtime --quiet nginx; }; }; } || \
		echo "nginx is missing and needs root to install (apt-get install nginx): the nginx tests will fail"

# The web settings need a SECRET_KEY outside debug to load; the tests then pin a fixed test key of their own
# (tests/conftest.py), so their results repeat.
test: install browser
	SECRET_KEY="$${SECRET_KEY:-$$($(VENV_PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')}" \
		$(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
