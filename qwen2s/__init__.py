"""qwen2-scratch's modules, installed under one name (the repository keeps them at its top level,
where qwen2_scratch.py, the model, is read end to end; this folder links to them)."""
