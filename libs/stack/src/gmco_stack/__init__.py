"""The local GMC-O stack."""
