# syntax=docker/dockerfile:1
#
# pubwarden container image: a release build on Debian 12, run on distroless
# (glibc + libgcc, no shell, no package manager) as the non-root user 65532.
#
#   docker build -t REGISTRY/pubwarden:0.1.0 .
#   docker run --rm -p 6380:6380 -p 9480:9480 REGISTRY/pubwarden:0.1.0 --upstream redis.example:6379
#
# Defaults baked in: the settings file /etc/pubwarden/pubwarden.yaml (a copy
# of config/pubwarden.yaml), clients on 0.0.0.0:6380, admin (/healthz,
# /readyz, /metrics) on 0.0.0.0:9480. The Helm chart (helm/pubwarden) mounts
# its own settings and sets these through PUBWARDEN_* variables.

# The toolchain the project is tested with (Cargo.toml's rust-version is the minimum).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cache mounts keep the registry and the target directory between builds;
# the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pubwarden \
 && install -D -m 0755 target/release/pubwarden /out/pubwarden

# Debian 12's glibc, like the build stage; :nonroot runs as 65532:65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/pubwarden /usr/local/bin/pubwarden
COPY config/pubwarden.yaml /etc/pubwarden/pubwarden.yaml
ENV PUBWARDEN_CONFIG=/etc/pubwarden/pubwarden.yaml \
    PUBWARDEN_LISTEN=0.0.0.0:6380 \
    PUBWARDEN_ADMIN_LISTEN=0.0.0.0:9480
USER 65532:65532
EXPOSE 6380 9480
ENTRYPOINT ["/usr/local/bin/pubwarden"]
