# GPU serving: the official vLLM OpenAI image at the supported version, plus the SpecGuard plugin.
#
#   docker build -t specguard-vllm .
#   docker run --gpus all -p 8000:8000 \
#       -v $PWD/configs/qwen2.5-math-7b.yaml:/config/specguard.yaml:ro \
#       -v ~/.cache/huggingface:/root/.cache/huggingface \
#       specguard-vllm Qwen/Qwen2.5-Math-7B-Instruct --speculative-config /config/specguard.yaml
#
# The plugin registers through vLLM's `vllm.general_plugins` entry point; with
# `method: specguard` it forces the settings it needs on CUDA (sync scheduling,
# the V1 model runner, PIECEWISE CUDA graphs) and logs each one.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/specguard-vllm
COPY pyproject.toml setup.py README.md ./
COPY specguard_vllm ./specguard_vllm
COPY kernels ./kernels
COPY configs ./configs
# Bundled evaluation data (GSM8K test split, MIT licence) for `specguard bench --dataset gsm8k`.
COPY data ./data
ENV SPECGUARD_DATA_DIR=/opt/specguard-vllm/data
# Everything the plugin needs (torch, triton, pydantic, PyYAML, transformers) is in the image;
# --no-deps keeps pip from touching vLLM's pinned stack. The version check fails the build
# if the base image's vLLM is not one the plugin supports.
RUN python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -c "from specguard_vllm.plugin.version import check_vllm_version; print('vLLM', check_vllm_version())"

ENV VLLM_USE_V2_MODEL_RUNNER=0
EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
