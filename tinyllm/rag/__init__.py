"""Retrieval-augmented generation (notes ch.08): chunking, embeddings, indexes, retrieval, answers."""
