# Visage service image: `docker build -t visage .` then `docker run -p 127.0.0.1:8000:8000 -v visage-data:/data visage`
# (or `docker compose up`). The API key is printed on first start and kept in the /data volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/visage

# CPU-only torch first (the default index would pull the multi-GB CUDA build); pip then keeps it for `pip install .`
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu

# The package with its shipped weights (model/weights/*.pt is package data). training/ is installed too because
# the `visage` command loads every package's subcommands; the service itself never imports it.
COPY pyproject.toml README.md LICENSE ./
COPY model ./model
COPY training ./training
COPY app ./app
RUN pip install . \
    && useradd --create-home --uid 10001 visage \
    && mkdir -p /data \
    && chown visage:visage /data

USER visage
ENV VISAGE_DATA_DIR=/data \
    VISAGE_HOST=0.0.0.0 \
    VISAGE_PORT=8000
VOLUME ["/data"]
EXPOSE 8000

# Healthy = ready to recognise (model and index loaded), not merely "the process answers" (/healthz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]

CMD ["visage", "serve", "--host", "0.0.0.0"]
