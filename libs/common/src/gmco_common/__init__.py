"""GMC-O shared runtime."""
