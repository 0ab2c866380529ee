# syntax=docker/dockerfile:1
#
# echotw in a container: TCP and UDP echo on 8080, metrics and health on 9100.
#
#   docker build -t echotw:0.1.0 .
#   docker run --rm -p 8080:8080/tcp -p 8080:8080/udp -p 9100:9100 echotw:0.1.0
#
# Arguments after the image name replace the default ones below (CMD); they
# are twistd echo's options.  Keep --metrics tcp:9100 (or give --health
# tcp:9100 when metrics are off): the health check asks there.

ARG PYTHON_VERSION=3.12

# Stage 1: build echotw's wheel and the wheels of everything it needs,
# TLS included (ssl: listeners and echotw-probe --tls need the tls extra),
# with a C compiler for the native echo lane (echotw/transport/_lane.c); without one
# the wheel would install and serve every connection on the Python path.
# The compiler stays in this stage.  Debian's packages are not pinned: the
# base image's release fixes their versions.
FROM python:${PYTHON_VERSION}-slim AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY echotw/ echotw/
COPY twisted/ twisted/
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[tls]'

# Stage 2: install those wheels, and nothing else, into a clean image.
FROM python:${PYTHON_VERSION}-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The wheels are mounted for this one step, not copied, so they stay out of
# the image.  Twisted's plugin cache is written now, as root: at run time
# the package directory is read-only to the server (and may be read-only
# altogether, as with Kubernetes' readOnlyRootFilesystem).  Unpinned, since
# only /wheels is searched, which holds the one echotw built above.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels 'echotw[tls]' \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && groupadd --system --gid 10001 echotw \
    && useradd --system --uid 10001 --gid echotw --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin echotw
# A numeric user, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001

EXPOSE 8080/tcp 8080/udp 9100/tcp

# Healthy while /healthz answers 200, which it does as long as the server's
# event loop runs (urllib raises, so exits non-zero, on anything else; slim
# images have no curl).  No proxy: the address is the container's own.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9100/healthz', timeout=4)"]

# In the foreground, without a pidfile (nothing to clean up after a crash),
# logging to standard output.  SIGTERM drains open connections first
# (--drain-delay, --shutdown-timeout).
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "echo"]
CMD ["--port", "8080", "--udp", "udp:8080", "--metrics", "tcp:9100"]
