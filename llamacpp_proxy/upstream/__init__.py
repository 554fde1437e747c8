"""The upstream: kept-alive HTTP/1.1 to llama.cpp and its API."""
