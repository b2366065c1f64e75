# omnidiff_jax for NVIDIA GPUs: JAX with its CUDA 12 wheels (no system CUDA toolkit needed, only the driver).
#   docker build -t omnidiff .
#   docker run --gpus all -v $PWD/ckpt:/ckpt omnidiff generate --model /ckpt --task t2i --text "a red apple"
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/omnidiff
COPY pyproject.toml README.md ./
COPY omnidiff_jax ./omnidiff_jax
COPY convert ./convert
COPY configs ./configs
RUN pip install '.[gpu]'
ENTRYPOINT ["omnidiff"]
CMD ["--help"]
