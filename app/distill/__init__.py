"""distill: knowledge distillation of a frozen teacher LLM into a Qwen3 student on JAX."""

__version__ = "0.1.0"
