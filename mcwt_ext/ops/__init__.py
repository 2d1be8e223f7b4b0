"""The compiled ops behind Python wrappers: mask sampling and masked layers fused with channel sums.

Importing this package loads ``mcwt_ext._C`` and registers ``torch.ops.mcwt_ext``.
"""
from .masked_conv import masked_conv_block, masked_linear_block
from .sampling import expected_density, logistic_bernoulli, logistic_topk

__all__ = ["expected_density", "logistic_bernoulli", "logistic_topk", "masked_conv_block", "masked_linear_block"]
