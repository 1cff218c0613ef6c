# The operator image: the `dist` build (release, optimised across crates) on a minimal, non-root base.
# Not built on the project's own machines (they have no container runtime); see docs/install.md.
FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --profile dist --locked -p drop && strip target/dist/drop

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/dist/drop /drop
USER 65532:65532
ENTRYPOINT ["/drop"]
CMD ["run"]
