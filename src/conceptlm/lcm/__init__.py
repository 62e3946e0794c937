"""Large Concept Model (arXiv 2412.08821): language modeling over sequences of sentence embeddings.

Documents are segmented into sentences, each sentence is embedded by a frozen encoder (the "concept"), a model
predicts the next concept, and a decoder turns concepts back into text.
"""
