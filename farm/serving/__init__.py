"""Serving: exports of registry versions (merged model, GGUF for Ollama) and the vLLM hand-off."""
