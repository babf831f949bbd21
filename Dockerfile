# splitq in a container: Debian 12 with the project's own dependency list, built once.
# docker-compose.yml runs every service from this image. CPU only (Debian's libtorch); for a
# GPU worker build on a host with PyTorch's CUDA libtorch instead (scripts/gpu-build.sh).
FROM debian:12
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
# Dependencies first, so that a source change does not reinstall them.
COPY scripts/deps.list scripts/install-deps.sh scripts/
RUN bash scripts/install-deps.sh --no-test && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPLITQ_TESTS=OFF \
      -DSPLITQ_SERVICES=ON \
 && cmake --build /build --target splitq splitq-health \
 && install -m 0755 /build/splitq /build/splitq-health /usr/local/bin/ \
 && rm -rf /build
WORKDIR /
# The data sets come from the Debian packages install-deps.sh installed
# (dataset-fashion-mnist, bible-kjv, dict-gcide).
ENTRYPOINT []
CMD ["splitq", "--help"]
