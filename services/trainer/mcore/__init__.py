"""Megatron-core pieces of the trainer's `megatron` backend: CPU shims, the one patch module, the
parallel layout, the model built from an HF config, packed attention, gradients across ranks."""
