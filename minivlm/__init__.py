"""minivlm."""
