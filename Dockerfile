# splitq in a container, in two stages (CPU only: Debian's libtorch; Dockerfile.gpu is the GPU
# variant):
#   build    Debian 12 with the project's build dependencies (scripts/install-deps.sh --no-test:
#            compilers, -dev packages); builds splitq and splitq-health, and lists the Debian
#            packages holding the shared libraries they load (scripts/runtime-packages.sh);
#   runtime  Debian 12 with only those packages, the data sets and OpenBLAS (the 'runtime' tag
#            of scripts/deps.list) and the two binaries. docker-compose.yml runs every service
#            from it.
# In each stage the packages are installed before the sources are copied, so a source change
# rebuilds splitq but reinstalls nothing (the runtime stage's package layer is reused as long as
# the list the build stage prints is the same).
#
# No registry is needed beyond a `debian:12` image, which scripts/docker-engine.sh makes with
# debootstrap where none can be pulled.
FROM debian:12 AS build
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
COPY scripts/deps.list scripts/install-deps.sh scripts/
RUN bash scripts/install-deps.sh --no-test && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPLITQ_TESTS=OFF \
      -DSPLITQ_SERVICES=ON \
 && cmake --build /build --target splitq splitq-health \
 && mkdir -p /out \
 && install -m 0755 /build/splitq /build/splitq-health /out/ \
 && bash scripts/runtime-packages.sh /out/splitq /out/splitq-health > /out/runtime-packages.list \
 && rm -rf /build

FROM debian:12 AS runtime
ENV DEBIAN_FRONTEND=noninteractive
COPY scripts/deps.list scripts/install-deps.sh /opt/splitq/
COPY --from=build /out/runtime-packages.list /opt/splitq/
RUN bash /opt/splitq/install-deps.sh --runtime /opt/splitq/runtime-packages.list \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY --from=build /out/splitq /out/splitq-health /usr/local/bin/
# A smoke check at build time: the binary starts (every library found) and the data sets and the
# `bible` program (bible-kjv) are where splitq looks for them.
RUN splitq --version && test -d /usr/share/datasets/fashion-mnist \
 && test -f /usr/share/dictd/gcide.dict.dz && command -v bible >/dev/null
ENTRYPOINT []
CMD ["splitq", "--help"]
