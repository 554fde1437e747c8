"""An OpenAI-compatible gateway in front of llama.cpp's server."""

__version__ = "0.1.0"
