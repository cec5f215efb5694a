"""Reading model files lazily and writing results: safetensors, .pth, folders."""
