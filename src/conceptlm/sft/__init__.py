"""Supervised fine-tuning / from-scratch next-token training of Hugging Face causal LMs.

The method-independent workload of the toolkit and the NTP baseline every other method is compared to: the config
in :mod:`conceptlm.sft.config`, the unit in :mod:`conceptlm.sft.unit`, the recipes in :mod:`conceptlm.sft.recipe`.
"""
