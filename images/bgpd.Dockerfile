# The route-reflector image: margay-bgpd, and margayctl for `margayctl bgp peers` inside the pod.
# Built from the repository root:
#   docker build -f images/bgpd.Dockerfile -t margay/bgpd:<tag> .
# Distroless; it binds the BGP port with NET_BIND_SERVICE and needs no other privilege as a
# pure route reflector (it installs no routes).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p margay-bgpd -p margayctl

FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/margay-bgpd /usr/local/bin/margay-bgpd
COPY --from=build /src/target/release/margayctl /usr/local/bin/margayctl
ENTRYPOINT ["/usr/local/bin/margay-bgpd"]
