"""Evaluation (notes ch.09): metrics, and the harnesses that use them."""
