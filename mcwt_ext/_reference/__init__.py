"""Pure-PyTorch references of every mcwt_ext op: the spec the kernels are tested against."""
from .masked_conv import masked_conv_block, masked_linear_block
from .sampling import calibrate_bias, expected_density, logistic_bernoulli, logistic_topk

__all__ = ["calibrate_bias", "expected_density", "logistic_bernoulli", "logistic_topk", "masked_conv_block", "masked_linear_block"]
