"""Which layers of the decoder stack are MoE (``--moe-layer-freq``), as Megatron-LM reads it.

``--moe-layer-freq N`` (int): layer i (0-based) is MoE when ``i % N == 0`` (N=1: every layer).
``--moe-layer-freq "[0]*1+[1]*27"`` (a Python list expression of 0/1, one entry per layer):
1 = MoE, 0 = dense (DeepSeek-MoE's first dense layer). Dense layers are Megatron-Core's MLP of
width ``--ffn-hidden-size``; MoE layers use ``--moe-ffn-hidden-size`` per expert.

The list is evaluated without ``eval``: only list literals of integers, ``+`` and ``*``.
"""

from __future__ import annotations

import ast


def parse_moe_layer_freq(text: str | int) -> int | list[int]:
    """``"2"`` -> 2; ``"[0]*1+[1]*3"`` -> [0, 1, 1, 1] (argparse ``type=``)."""
    if isinstance(text, int):
        return text
    text = str(text).strip()
    if not text.startswith("["):
        return int(text)
    try:
        value = _evaluate(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError) as err:
        raise ValueError(
            f"--moe-layer-freq {text!r}: expected an integer or a list expression such as "
            f'"[0]*1+[1]*27" ({err})'
        ) from None
    if not isinstance(value, list) or any(v not in (0, 1) for v in value):
        raise ValueError(f"--moe-layer-freq {text!r}: the list must hold only 0 and 1")
    return value


def _evaluate(node):
    if isinstance(node, ast.List):
        return [_evaluate(elt) for elt in node.elts]
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _evaluate(node.left), _evaluate(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError(f"{ast.dump(node)[:40]}... is not allowed")


def moe_layer_pattern(freq: int | list[int], num_layers: int) -> tuple[bool, ...]:
    """``True`` for each MoE layer (0-based), Megatron-Core's ``get_gpt_decoder_block_spec``
    rule."""
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"--moe-layer-freq {freq} must be positive")
        return tuple(i % freq == 0 for i in range(num_layers))
    if len(freq) != num_layers:
        raise ValueError(
            f"--moe-layer-freq lists {len(freq)} layers but --num-layers is {num_layers}"
        )
    return tuple(bool(v) for v in freq)


def chunk_first_layer(num_layers: int, pp: int, vpp: int | None, pp_rank: int, vp_stage) -> int:
    """Global 0-based index of the first layer of model chunk (pp_rank, vp_stage): Megatron's
    interleaved order, equal layers per chunk (layout.py checks the divisibility)."""
    chunks = pp * (vpp or 1)
    per_chunk = num_layers // chunks
    return ((vp_stage or 0) * pp + pp_rank) * per_chunk
