"""Host glue: everything that knows ComfyUI (its ModelPatcher, UNet classes, folders)."""
