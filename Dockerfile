# credgate as a small, non-root container image.
#   docker build -t credgate .
#   docker run --rm -e OBLIEN_CLIENT_ID -e OBLIEN_CLIENT_SECRET \
#     -v "$PWD/config/credgate.toml:/etc/credgate/credgate.toml:ro" credgate
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY config config
RUN cargo build --release --locked && strip target/release/credgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin credgate
COPY --from=build /src/target/release/credgate /usr/local/bin/credgate
# The config is mounted here (read-only); secrets come from env vars or mounted files
# (e.g. a Kubernetes Secret volume at /run/secrets/credgate), never from the image.
COPY config/credgate.toml /etc/credgate/credgate.toml
ENV CREDGATE_CONFIG=/etc/credgate/credgate.toml
USER 10001:10001
EXPOSE 8080 9090
# Needs `[server] admin` in the config; `credgate health` needs no curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["/usr/local/bin/credgate", "health"]
ENTRYPOINT ["/usr/local/bin/credgate"]
