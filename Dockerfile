# pld_ds on NVIDIA's PyTorch image: CUDA, NCCL and apex come with it; its torch is kept as is
# (requirements.txt does not name torch, so pip has nothing to downgrade).
FROM nvcr.io/nvidia/pytorch:25.01-py3

ENV PYTHONUNBUFFERED=1 \
    NCCL_ASYNC_ERROR_HANDLING=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN

WORKDIR /opt/pld_ds
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# The deepspeed launcher and SLURM's srun both run commands in this image directly.
CMD ["bash", "launch/single_node.sh"]
