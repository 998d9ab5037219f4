"""`nextmm serve`: the OpenAI-compatible server (app.py), its dynamic batching (batching.py), its request and response
shapes (schema.py), and the web page it serves (static/)."""
