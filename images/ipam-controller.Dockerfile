# The IPAM controller image. Built from the repository root:
#   docker build -f images/ipam-controller.Dockerfile -t margay/ipam-controller:<tag> .
# It talks only to the datastore, so it runs distroless and as a non-root user.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p margay-ipam-controller

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/margay-ipam-controller /usr/local/bin/margay-ipam-controller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/margay-ipam-controller"]
