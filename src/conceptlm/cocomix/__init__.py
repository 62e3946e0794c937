"""CoCoMix: pretraining with continuous concepts (arXiv 2502.08524).

A TopK sparse autoencoder on a frozen teacher's hidden states defines the concept space; attribution picks the
concepts each token's continuation depends on; a student predicts them at one layer, compresses its prediction into
a continuous concept and mixes it into its hidden states for the remaining layers.
"""
