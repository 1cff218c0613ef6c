# The operator image: a static-ish release build on a minimal, non-root base.
# Not built on the project's own machines (they have no container runtime); see docs/install.md.
FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p drop && strip target/release/drop

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/drop /drop
USER 65532:65532
ENTRYPOINT ["/drop"]
CMD ["run"]
