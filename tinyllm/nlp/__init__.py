"""Classic NLP of chapter 1: word segmentation, POS tagging, keywords, Word2Vec, n-gram language models.

Modules are imported explicitly (`from tinyllm.nlp.segment import Segmenter`); this package imports nothing
eagerly, so `import tinyllm.nlp` stays free of optional dependencies.
"""
