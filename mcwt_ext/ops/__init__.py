"""The compiled ops behind Python wrappers: mask sampling and masked layers fused with channel sums.

Importing this package loads ``mcwt_ext._C`` and registers ``torch.ops.mcwt_ext``.
"""
from .masked_conv import conv_path, layer_path, masked_conv_block, masked_linear_block
from .sampling import calibrate_bias, expected_density, logistic_bernoulli, logistic_topk

__all__ = ["calibrate_bias", "expected_density", "logistic_bernoulli", "logistic_topk", "masked_conv_block", "masked_linear_block",
           "conv_path", "layer_path"]
