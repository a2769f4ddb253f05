"""existing-project: A Flower / PyTorch app."""
