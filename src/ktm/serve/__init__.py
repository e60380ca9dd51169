"""The serving layer: export to a plain model folder (``export``) and the client-side prompt
encoder, payloads and ``ktm serve`` (``serving``). Sits on ``ktm.model``."""
