"""Supervised fine-tuning / from-scratch next-token training of Hugging Face causal LMs.

The method-independent workload of the toolkit and the NTP baseline every other method is compared to.
"""

from conceptlm.sft.config import SFTConfig
from conceptlm.sft.unit import SFTUnit

__all__ = ["SFTConfig", "SFTUnit"]
