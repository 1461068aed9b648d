"""Command-line apps: `tttkd-prep` (extraction) and `tttkd` (training, adaptation, benchmarks)."""
