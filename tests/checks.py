"""Checks shared by several test modules: the library's results against the float64 model of :mod:`oracle`."""

import ml_dtypes
import numpy as np
from oracle import attention as oracle_attention
from oracle import quantize as oracle_quantize

import oscar_cupy as oc


def assert_matches_oracle(k, v, config, lengths, qkv):
    """Parameters equal the float64 model's, but where the float32 pipeline's last bits move a min/max across a
    scale-dtype boundary; codes equal the model's values encoded with the library's parameters, but at rounding ties;
    padding is zero; dequantized values are within half a scale of the model's."""
    model = oracle_quantize(k, v, config, lengths)
    keys, values = oc.quantized_kv.dequantized_rotated(qkv)
    finfo = ml_dtypes.finfo(oc.quantizer.scale_dtype(config.scale_dtype))
    scale_eps, tiny = float(finfo.eps), 2 * float(finfo.smallest_subnormal)
    for part, codes_of in (("k", oc.layout.unpack_key_codes), ("v", oc.layout.unpack_value_codes)):
        codes = codes_of(getattr(qkv, f"{part}_codes"), config.bits).astype(np.float64)[:, :, : k.shape[2]]
        scales = getattr(qkv, f"{part}_scales").astype(np.float64)
        zeros = getattr(qkv, f"{part}_zeros").astype(np.float64)
        stored = model["keys" if part == "k" else "values"]
        magnitude = np.abs(stored).max(axis=(2, 3), initial=0)  # (B, Hk)
        same = counted = 0
        for index, scale in model[f"{part}_scales"].items():
            zero = model[f"{part}_zeros"][index]
            # the float32 rotation moves each value by a few float32 ulps of its vector's magnitude
            slack = tiny + 2e-6 * magnitude[index[:2]]
            assert abs(zeros[index] - zero) <= 2 * scale_eps * abs(zero) + slack, (part, index, zeros[index], zero)
            # a key group of one valid token has a scale made of that token's last bits: not checked
            if part == "v" or lengths[index[0]] - index[2] * config.key_group > 1:
                assert abs(scales[index] - scale) <= 2 * scale_eps * abs(scale) + slack, (part, index, scales[index])
                counted += 1
                same += scales[index] == scale and zeros[index] == zero
        if config.scale_dtype != "float32":  # float16/bfloat16 rounding absorbs the float32 pipeline's last bits
            assert same >= 0.98 * counted
        # codes: the float64 values encoded with the library's own parameters, up to rounding ties
        axis, group = (2, config.key_group) if part == "k" else (3, config.value_group)
        scales = np.repeat(scales, group, axis=axis)[:, :, : k.shape[2]]
        zeros = np.repeat(zeros, group, axis=axis)[:, :, : k.shape[2]]
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = np.clip(np.rint(np.where(scales > 0, (stored - zeros) / scales, 0)), 0, 2**config.bits - 1)
        token = np.arange(k.shape[2])[None, :]
        checked = token < np.asarray(lengths)[:, None]
        if part == "k":  # not the codes of one-token key groups, whose tiny scale is that token's last bits
            group_fill = np.minimum(np.asarray(lengths)[:, None] - token // group * group, group)
            checked &= group_fill > 1
        differ = np.abs(codes - expected)[np.broadcast_to(checked[:, None, :, None], codes.shape)]
        assert differ.max(initial=0) <= 1 and np.count_nonzero(differ) <= 1e-3 * differ.size + 2
    # padding: code 0 everywhere beyond the lengths
    for b, n in enumerate(lengths):
        assert not oc.layout.unpack_key_codes(qkv.k_codes, config.bits)[b, :, n:].any()
        assert not oc.layout.unpack_value_codes(qkv.v_codes, config.bits)[b, :, n:].any()
        assert not qkv.v_scales[b, :, n:].astype(np.float32).any()
        if qkv.norms is not None:
            assert not qkv.norms[b, :, n:].any()
            np.testing.assert_allclose(qkv.norms[b, :, :n], model["norms"][b, : qkv.norms.shape[1], :n], rtol=1e-6)
    # dequantized values sit within half a scale of the model's stored-basis values
    kk = keys[:, :, : k.shape[2]]
    k_scales = np.repeat(qkv.k_scales.astype(np.float64), config.key_group, axis=2)[:, :, : k.shape[2]]
    for b, n in enumerate(lengths):
        error = np.abs(kk[b, :, :n] - model["keys"][b, :, :n])
        assert np.all(error <= k_scales[b, :, :n] * 0.5001 + 1e-5)
        v_scales = np.repeat(qkv.v_scales.astype(np.float64), config.value_group, axis=3)[b, :, :n]
        assert np.all(np.abs(values[b, :, :n] - model["values"][b, :, :n]) <= v_scales * 0.5001 + 1e-5)


def reference(q, qkv, window_k=None, window_v=None, window_lengths=None, scale=None):
    """float64 attention over exactly the values that qkv stores (isolates the attention math)."""
    keys, values = oc.quantized_kv.dequantized_rotated(qkv)
    norms = np.ones(keys.shape[:3]) if qkv.norms is None else np.broadcast_to(qkv.norms, keys.shape[:3])
    if window_k is not None and window_lengths is None:
        window_lengths = [window_k.shape[2]] * q.shape[0]
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    return oracle_attention(q, keys, values, norms, qkv.lengths, window_k, window_v, window_lengths,
                            qkv.config.rotation, qkv.config.rotate_values, scale)
