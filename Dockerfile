# The herald node as a container image.
#
# Two stages: the first builds the release binary with the full Rust toolchain, the
# second is Debian slim with only that binary, a health probe and an unprivileged user.
# The runtime needs nothing else: no TLS library (Redis is reached over plain TCP) and
# no curl (the probe is plain bash).
#
#   docker build -t herald .
#   docker run --rm -p 8080:8080 -e HERALD_JWT_SECRET -e HERALD_API_KEY herald
#
# The image never runs in dev mode by itself: it listens on 0.0.0.0, where a node without
# keys refuses to start (README, "Dev mode"), and keys shorter than 32 bytes are refused
# too. Give it both keys from a secret store (`openssl rand -hex 32` makes one). For a
# local try-out, turn dev mode on explicitly and publish on loopback only:
#
#   docker run --rm -p 127.0.0.1:8080:8080 -e HERALD_DEV=1 herald
#
# docker-compose.yml builds it for its three nodes (dev mode on, explicitly).

FROM rust:1-bookworm AS build
WORKDIR /src
# .dockerignore keeps target/, .git and local state out of the context.
COPY . .
# --locked: exactly the dependency versions of Cargo.lock, as CI tests them.
RUN cargo build --release --locked -p herald-server --bin herald \
    && install -D -m 0755 target/release/herald /out/herald

FROM debian:bookworm-slim
# A fixed uid, so volume permissions and Kubernetes' runAsUser can name it.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin herald
COPY --from=build /out/herald /usr/local/bin/herald
COPY deploy/readyz-probe /usr/local/bin/readyz-probe
USER herald:herald
# Inside a container the node must listen on every interface; the published port decides
# who can reach it. Every other setting comes from the environment (README, Configuration).
# No HERALD_DEV and no keys here: the keys come from whoever runs the image.
ENV HERALD_LISTEN=0.0.0.0:8080
EXPOSE 8080
# Ready = accepts clients (Redis reachable, not draining): /readyz, not /healthz.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/readyz-probe", "127.0.0.1:8080"]
# SIGTERM starts the drain (HERALD_DRAIN_MS, 10 s); the node exits within it plus 5 s,
# so give it a stop timeout of at least 20 s (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/herald"]
