"""Training data (notes ch.03): corpus → token shards and packed batches (text.py); SFT and preference data."""
