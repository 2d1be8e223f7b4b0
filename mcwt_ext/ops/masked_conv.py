"""Fused masked layer + connectivity sums (ops ``masked_conv2d_relu_sums`` and
``masked_linear_relu_sums``).

One call computes the activation that enters the next layer of a ticket and,
in the same pass, that activation's per-channel sums. Divided by the number
of positions averaged over (``N*H'*W'`` for a conv, ``N`` for a linear layer)
the sums are the connectivity ``g`` of the next layer's inputs, which the
greedy sampler needs layer by layer.

On CUDA the conv has two implementations: ``cudnn`` (cuDNN conv of the masked
weight + one fused epilogue kernel) and ``direct`` (one tiled kernel that masks
the weight on the fly; it falls back to ``cudnn`` for kernels too large for its
shared-memory tiles). Which one runs is a fixed rule of the layer's shapes, its
dtype and the GPU's compute capability (``csrc/conv_path.h``, and
:func:`conv_path` here), never a timing: the same layer on the same GPU model
takes the same path, and so gives the same sums, in every process. The
environment variable ``MCWT_CONV_IMPL`` (``cudnn``, ``direct``; ``auto`` or
unset: the rule) overrides it, for debugging only. The linear op is a 1x1
cuDNN conv on CUDA.

Both ops compute float32 layers in IEEE float32 whatever the global TF32/BF16
settings, which they only read: on CUDA by asking cuDNN per call, on CPU by
leaving oneDNN for ATen's IEEE paths when the user let oneDNN's float32 go
below IEEE. The sums are connectivity, which the sampler compares across
devices.
"""
import torch

from .. import _extension  # noqa: F401  (loads _C, which registers the ops)

__all__ = ["masked_conv_block", "masked_linear_block", "CONV_IMPL_ENV", "conv_path", "layer_path"]

#: Debugging override of the CUDA conv implementation ("cudnn", "direct"; "auto": the rule).
CONV_IMPL_ENV = "MCWT_CONV_IMPL"

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def conv_path(weight_shape, dtype: torch.dtype, capability: tuple[int, int]) -> str:
    """The CUDA path (``"cudnn"`` or ``"direct"``) of a masked conv layer with a weight of
    ``weight_shape`` ([K, C, kh, kw]) and ``dtype`` on a GPU of compute ``capability`` (major,
    minor): the rule of ``csrc/conv_path.h``, or ``MCWT_CONV_IMPL``. Answers on any build."""
    k, c, kh, kw = (int(d) for d in weight_shape)
    return torch.ops.mcwt_ext.conv_path(c, k, kh, kw, dtype, 10 * int(capability[0]) + int(capability[1]))


def layer_path(kind: str, weight: torch.Tensor, device) -> str:
    """What computes a fused layer op of ``kind`` ("conv", "conv_pool" or "linear") with
    ``weight`` on ``device``: ``"cpu"`` (oneDNN, or ATen's IEEE paths), or on CUDA the conv's
    :func:`conv_path` and ``"cudnn"`` for a linear layer (a 1x1 cuDNN conv)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    if kind == "linear":
        return "cudnn"
    return conv_path(weight.shape, weight.dtype, torch.cuda.get_device_capability(device))


def _check_tensor(name, t, dim, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {what}, got shape {tuple(t.shape)}")


def _check_layer(input, weight, mask, bias, dim, in_what, w_what):
    """Checks shared by both ops; the C++ kernels repeat them with TORCH_CHECK."""
    _check_tensor("input", input, dim, in_what)
    _check_tensor("weight", weight, dim, w_what)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16/bfloat16/float32/float64, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal input dtype {input.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}"
        )
    if input.shape[1] != weight.shape[1]:
        raise ValueError(
            f"input has {input.shape[1]} channels/features but weight expects {weight.shape[1]}"
        )
    for name, t in (("weight", weight), ("mask", mask)):
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if bias.dtype != input.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal input dtype {input.dtype}")
        if bias.device != input.device:
            raise ValueError(f"bias is on {bias.device} but input is on {input.device}")


def _padding_pair(padding):
    pair = (padding, padding) if isinstance(padding, int) else padding
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in pair)
    ):
        raise TypeError(f"padding must be an int or a pair of ints, got {padding!r}")
    if pair[0] < 0 or pair[1] < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return tuple(pair)


def _conv_out_size(input_shape, weight_shape, padding, pool):
    """(Ho, Wo) of the stride-1 conv and (H', W') of y."""
    ho = input_shape[2] + 2 * padding[0] - weight_shape[2] + 1
    wo = input_shape[3] + 2 * padding[1] - weight_shape[3] + 1
    return (ho, wo), ((ho // 2, wo // 2) if pool else (ho, wo))


def masked_conv_block(input, weight, mask, bias=None, *, padding=1, pool=False):
    """``y = [max_pool2d(2)](relu(conv2d(input, weight * mask, bias, padding)))``
    and ``sums[k] = y[:, k].sum()`` in float64.

    Args:
        input: [N, C, H, W] float tensor (any layout).
        weight: [K, C, kh, kw], input's dtype and device.
        mask: bool, weight's shape; False entries are pruned.
        bias: optional [K].
        padding: int or (ph, pw), zero padding of the stride-1 conv.
        pool: apply a 2x2 max-pool (floor mode) after the ReLU.

    Returns:
        ``(y, sums)``: y [N, K, H', W'] in input's dtype; sums float64 [K].
    """
    _check_layer(input, weight, mask, bias, 4, "[N, C, H, W]", "[K, C, kh, kw]")
    pad = _padding_pair(padding)
    (ho, wo), _ = _conv_out_size(input.shape, weight.shape, pad, pool)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"weight kernel {tuple(weight.shape[2:])} is larger than the padded input "
            f"{(input.shape[2] + 2 * pad[0], input.shape[3] + 2 * pad[1])}"
        )
    if pool and (ho < 2 or wo < 2):
        raise ValueError(f"conv output {(ho, wo)} is too small for 2x2 max-pooling (pool=True)")
    return torch.ops.mcwt_ext.masked_conv2d_relu_sums(
        input, weight, mask, bias, list(pad), bool(pool)
    )


def masked_linear_block(input, weight, mask, bias=None):
    """``y = relu(input @ (weight * mask).T + bias)`` and ``sums[j] = y[:, j].sum()``
    in float64.

    Args:
        input: [N, in] float tensor; weight: [out, in]; mask: bool, weight's shape;
        bias: optional [out].

    Returns:
        ``(y, sums)``: y [N, out] in input's dtype; sums float64 [out].
    """
    _check_layer(input, weight, mask, bias, 2, "[N, in]", "[out, in]")
    return torch.ops.mcwt_ext.masked_linear_relu_sums(input, weight, mask, bias)


@torch.library.register_fake("mcwt_ext::masked_conv2d_relu_sums")
def _masked_conv2d_relu_sums_fake(input, weight, mask, bias, padding, pool):
    _, (hy, wy) = _conv_out_size(input.shape, weight.shape, padding, pool)
    k = weight.shape[0]
    return (
        input.new_empty((input.shape[0], k, hy, wy)),
        input.new_empty((k,), dtype=torch.float64),
    )


@torch.library.register_fake("mcwt_ext::masked_linear_relu_sums")
def _masked_linear_relu_sums_fake(input, weight, mask, bias):
    k = weight.shape[0]
    return (
        input.new_empty((input.shape[0], k)),
        input.new_empty((k,), dtype=torch.float64),
    )
