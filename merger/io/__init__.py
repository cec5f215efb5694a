"""Reading and writing model files: safetensors (strict headers, lazy reads, streamed writes),
PyTorch checkpoints (merger's own restricted unpickler), Hugging Face folders; where a source's
files are and how to open them.

May import: merger.core (and merger.errors).
"""
