"""reconad."""
