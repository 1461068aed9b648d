"""Class lists, label maps and split lists, shipped as package data."""
