"""Front doors: the Tornado handlers and the OpenAI request/response shapes."""
