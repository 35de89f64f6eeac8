"""Training motion modules and motion LoRAs with the image model frozen (AnimateDiff's recipe).

- ``dataset``: videos + captions -> clips (pure; no host imports), the sharded sampler, the latent cache.
- ``lora``: motion LoRA adapters and the published motion-LoRA key layout (pure).
- ``loop``: the training loop inside the host's UNet (imports the host).
- ``cli``: ``python -m headless train`` and torchrun launches.

Importing this package imports neither the host nor torch.distributed state; ``loop`` does the former.
"""
