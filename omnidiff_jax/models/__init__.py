"""One module per network: `dream` (the LLM); the modality front ends live beside it."""
