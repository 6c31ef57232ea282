"""Other formats: reading and writing torch.save / safetensors files and folders, export and import."""
