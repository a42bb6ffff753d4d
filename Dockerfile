# ftlaunch in a container, installed the way the README's set-up does: `bash scripts/setup.sh`.
#
#   docker build -t ftlaunch .                                    # CPU image (default)
#   docker build -t ftlaunch:cuda --build-arg TORCH_VARIANT=cu128 .  # CUDA image (needs the host's NVIDIA driver)
#   docker run --rm -v "$PWD/runs:/opt/ftlaunch/runs" ftlaunch \
#       --nproc_per_node=2 launcher/run.py --config configs/encoder.yaml --run-dir runs/enc1
#
# The entry point is `ftrun` (torchrun-compatible; falls back to `torchrun` if absent), so the
# arguments are a torchrun command line. Run the same `docker run` again to resume.
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

# Which torch build scripts/setup.sh installs: `cpu`, or a CUDA variant of the PyTorch wheel
# index (cu126, cu128, ...). The CUDA wheels bring their own CUDA libraries, so one base image
# serves both. ARGs reach the RUN below as environment variables, so pip picks torch from that
# index (PyPI for the rest) without the image keeping these settings.
ARG TORCH_VARIANT=cpu
ARG PIP_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG PIP_EXTRA_INDEX_URL=https://pypi.org/simple
ARG PIP_NO_CACHE_DIR=1

WORKDIR /opt/ftlaunch
COPY . .
RUN bash scripts/setup.sh

ENV PATH=/opt/ftlaunch/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["/bin/sh", "-c", "if command -v ftrun >/dev/null 2>&1; then exec ftrun \"$@\"; else exec torchrun \"$@\"; fi", "ftlaunch"]
CMD ["--help"]
