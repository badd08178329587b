"""Reading adapter files and LoRA dataset folders (numpy + safetensors; no JAX tracing)."""
