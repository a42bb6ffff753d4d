# ftlaunch in a container, installed the way the README's set-up does: `bash scripts/setup.sh`.
#
#   docker build -t ftlaunch .                                       # CPU image (default)
#   docker build -t ftlaunch:cuda --build-arg TORCH_VARIANT=cu128 .  # CUDA image (needs the host's NVIDIA driver)
#   docker run --rm -v "$PWD/runs:/opt/ftlaunch/runs" ftlaunch \
#       --standalone --nproc_per_node=2 launcher/run.py --config configs/encoder.yaml --run-dir runs/enc1
#
# The entry point is `ftrun` (torchrun-compatible), so the arguments are a torchrun command
# line. Run the same `docker run` again to resume.
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

# Which torch build: `cpu`, or a CUDA variant of the PyTorch wheel index (cu126, cu128, ...);
# the CUDA wheels bring their own CUDA libraries, so one base image serves both. scripts/setup.sh
# installs torch alone from that variant's index (--index-url for that one install;
# --build-arg TORCH_INDEX_URL=... names a mirror of it). Every other package, torch's own
# dependencies included, comes from pip's configuration: PyPI unless the builder passes
# --build-arg PIP_INDEX_URL=... (and PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST). ARGs without a
# default stay unset unless passed, and none of them is kept in the image.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_NO_CACHE_DIR=1

WORKDIR /opt/ftlaunch
COPY . .
RUN bash scripts/setup.sh

ENV PATH=/opt/ftlaunch/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["ftrun"]
CMD ["--help"]
