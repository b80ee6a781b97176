# The node image: the agent margay-node, the CNI plugins margay and margay-ipam, their installer
# margay-cni, and margayctl. Built from the repository root:
#   docker build -f images/node.Dockerfile -t margay/node:<tag> .
# The agent programs nftables through the nft tool, so the runtime stage is Debian slim with
# nftables rather than distroless. It runs as root with NET_ADMIN, NET_RAW and NET_BIND_SERVICE
# only (see the chart); the CNI binaries are copied to the host and run by the container runtime.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p margay-node -p margay-cni -p margayctl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends nftables iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/margay-node /usr/local/bin/margay-node
COPY --from=build /src/target/release/margay /usr/local/bin/margay
COPY --from=build /src/target/release/margay-ipam /usr/local/bin/margay-ipam
COPY --from=build /src/target/release/margay-cni /usr/local/bin/margay-cni
COPY --from=build /src/target/release/margayctl /usr/local/bin/margayctl
ENTRYPOINT ["/usr/local/bin/margay-node"]
