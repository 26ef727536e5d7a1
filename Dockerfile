# pld_ds on NVIDIA's PyTorch image, which brings CUDA, cuDNN, NCCL and a torch built for them.
# pip keeps that torch: requirements.txt does not name it, and the image's version is pinned as a constraint,
# so a dependency that wanted another torch fails the build instead of replacing it.
#   docker build -t pld_ds .                      (older drivers: --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# A failed or stuck collective ends the process instead of hanging it, so a relaunch can resume.
# DeepSpeed's C++/CUDA ops are left to compile on first use on the target GPU; the shipped configs use none.
# pip may install beside the image's packages even where its Python is marked as managed by the system.
ENV PYTHONUNBUFFERED=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN \
    DS_BUILD_OPS=0 \
    PIP_BREAK_SYSTEM_PACKAGES=1

WORKDIR /opt/pld_ds
# Dependencies in a layer of their own: editing the code does not reinstall them.
COPY requirements.txt .
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt \
 && pip install --no-cache-dir -c /tmp/keep-torch.txt -r requirements.txt \
 && rm /tmp/keep-torch.txt
COPY . .
# The project with its input-format extras (raw Wikipedia dumps, parquet, Hugging Face export), as
# scripts/setup.sh installs them, still keeping the image's torch.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt \
 && pip install --no-cache-dir -c /tmp/keep-torch.txt -e ".[wiki,parquet,hf]" \
 && rm /tmp/keep-torch.txt \
 && python -c "import deepspeed, pld_ds.pretrain, mwparserfromhell, pyarrow, transformers"

# No command: pretrain with the DATA, OUTPUT, ... settings of launch/common.sh; any command runs as given.
ENTRYPOINT ["bash", "/opt/pld_ds/launch/entrypoint.sh"]
