# One image for every application service of docker-compose.yml: web (daphne), the workers, beat,
# trunk and prepare-model differ only in their command. (The compose file's nginx runs the official
# nginx image.)
#
#   docker build -t splitlearn-studio .
#   docker run --rm -p 8000:8000 -e SECRET_KEY=... -e DATABASE_URL=... -e REDIS_URL=... splitlearn-studio
#
# The default command serves the web app (HTTP and WebSockets) with daphne, reached directly;
# docker-compose.yml runs `python manage.py migrate --noinput` and `collectstatic` before it and
# adds --proxy-headers, as nginx is in front there. Static files are collected into the image at
# build time, so WhiteNoise serves them from STATIC_ROOT without the finders; compose mounts a
# volume on STATIC_ROOT (the app user may write it) that nginx serves from.
FROM python:3.11-slim

# Where torch comes from. The CPU index keeps the image small; for a GPU trunk pass a CUDA
# build, e.g. --build-arg TORCH_INDEX_URL=https://pypi.org/simple (PyPI's Linux wheels use CUDA).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    SPLITLEARN_DATA_DIR=/data \
    STATIC_ROOT=/app/staticfiles \
    WHITENOISE_USE_FINDERS=false

# The application runs as "app"; it owns only the data directory. Named volumes mounted on
# these subdirectories start with the image's ownership, so the app can write to them.
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data/media /data/jobs /data/models /data/beat \
    && chown -R app:app /data

WORKDIR /app

# torch first and pinned: resolved as a dependency of another package it would pull
# several GB of CUDA wheels. The CPU wheel (2.13.0+cpu) satisfies the pin torch==2.13.0.
COPY pyproject.toml constraints.txt ./
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0

# The dependencies in their own layer, so that a change of the code does not reinstall them.
RUN python -c "import tomllib; \
        project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
        print('\n'.join(project['dependencies'] + project['optional-dependencies']['postgres']))" \
        > /tmp/requirements.txt \
    && pip install --constraint constraints.txt --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Editable, as `make install` does: webapp finds templates/ and static/ next to its source in /app.
# The code stays owned by root, read-only for the app user.
COPY . .
RUN pip install --constraint constraints.txt --editable ".[postgres]"

# Settings refuse to load without a secret key; this one exists only during the build.
RUN SECRET_KEY=collectstatic-at-build-time python manage.py collectstatic --noinput --verbosity 0 \
    && chown -R app:app "$STATIC_ROOT"

USER app
EXPOSE 8000
CMD ["daphne", "--bind", "0.0.0.0", "--port", "8000", "webapp.asgi:application"]
