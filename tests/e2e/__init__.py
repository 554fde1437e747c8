"""End-to-end tests: a real llama-server with the Gemma 3 270M model, the proxy as a process."""
