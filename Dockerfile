# reir on Ray (CPU). The base image's Ray must equal the `ray[...]==X` pin in
# pyproject.toml (tests/ops/test_dockerfiles.py checks it), so the KubeRay cluster,
# the Serve config schema and the installed code all speak the same Ray.
#   docker build -t reir:0.1.0 .
FROM rayproject/ray:2.60.0-py311

ENV HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /home/ray/reir
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users reir ./reir

# torch first, as the Makefile does: the pinned pair, CPU wheels (no CUDA in this image).
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu \
 && pip install . \
 && python -c "import ray, reir, torch, deepspeed, pymilvus; assert ray.__version__ == '2.60.0', ray.__version__" \
 && reir --help > /dev/null
