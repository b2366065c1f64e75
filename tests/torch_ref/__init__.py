"""PyTorch reference implementations written for our parity tests, with the upstream state_dict names."""
