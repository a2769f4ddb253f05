"""HyperFedZero on Flower."""
