# Domum Gateway container image. Build: docker build -t domum-gateway .
# Run:   docker run -p 8443:8443 -p 2222:2222 -v domum:/srv/domum domum-gateway
FROM node:20-slim AS assets
WORKDIR /build
COPY package.json package-lock.json* ./
COPY scripts ./scripts
RUN if [ -f package.json ]; then npm ci --no-audit --no-fund && node scripts/build-assets.mjs; fi; \
    mkdir -p src/domum_gateway/static/vendor

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DOMUM_CONFIG=/srv/domum/config/domum.toml
RUN useradd --system --create-home --home-dir /srv/domum --uid 10001 domum
WORKDIR /opt/domum
COPY pyproject.toml README.md ./
COPY src ./src
COPY --from=assets /build/src/domum_gateway/static/vendor ./src/domum_gateway/static/vendor
RUN pip install --no-cache-dir . && rm -rf /root/.cache
USER domum
WORKDIR /srv/domum
VOLUME ["/srv/domum"]
# Public listener (HTTPS) and SSH jump server. The admin listener stays on loopback
# inside the container unless [admin].listen is changed deliberately.
EXPOSE 8443 2222
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import ssl,urllib.request as u; c=ssl.create_default_context(cafile='/srv/domum/certs/ca.crt'); u.urlopen('https://127.0.0.1:9443/healthz', context=c, timeout=4)" || exit 1
CMD ["sh", "-c", "[ -f \"$DOMUM_CONFIG\" ] || domum-gateway init --config \"$DOMUM_CONFIG\" --hostname \"${DOMUM_HOSTNAME:-localhost}\"; exec domum-gateway serve --config \"$DOMUM_CONFIG\""]
