"""Exporters: ATQ artifacts -> formats that other runtimes load (llama.cpp GGUF, transformers BitNet)."""
