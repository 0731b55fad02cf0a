"""The MoE flags of issue 13: Megatron-LM's names and meanings, presets, checks before any build."""

import pytest
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.arguments import LayoutError, parse_args
from megatron_ext.model import PRESETS, param_counts
from megatron_ext.model.stack import moe_layer_pattern, parse_moe_layer_freq

BASE = "--cpu --mock-data --train-iters 1 --vocab-size 1000 --model tiny".split()


@pytest.mark.parametrize(
    "freq,layers",
    [(1, 4), (2, 6), (3, 7), ([0, 1, 1, 0, 1, 1], 6), ("[0]*1+[1]*27", 28), ("[1,0]*2", 4)],
)
def test_moe_layer_freq_matches_megatron_core(freq, layers):
    """Megatron-Core's own decoder spec builder decides which layers are MoE the same way."""
    value = parse_moe_layer_freq(freq) if isinstance(freq, str) else freq
    cfg = TransformerConfig(num_layers=layers, hidden_size=16, num_attention_heads=2,
                            num_moe_experts=4, moe_layer_freq=value, add_bias_linear=False,
                            use_cpu_initialization=True)  # fmt: skip
    specs = get_gpt_decoder_layer_specs(cfg, use_transformer_engine=False)
    megatron = tuple(s.submodules.mlp.module.__name__ == "MoELayer" for s in specs)
    assert moe_layer_pattern(value, layers) == megatron


@pytest.mark.parametrize("bad", ["[0]*2+__import__('os')", "[2,1]", "[0]*(1+1)-[1]", "x"])
def test_moe_layer_freq_refuses_anything_but_a_list_of_0_and_1(bad):
    with pytest.raises(ValueError):
        parse_moe_layer_freq(bad)


def test_deepseek_preset_counts_match_the_report():
    """DeepSeek-MoE report: 16.4B total, 2.8B activated parameters."""
    counts = param_counts(PRESETS["deepseek-moe-16b"])
    assert counts["total"] == 16_375_728_128 and round(counts["total"] / 1e9, 1) == 16.4
    assert counts["active"] == 2_828_650_496 and round(counts["active"] / 1e9, 1) == 2.8
    assert counts["dense_mlp"] == 3 * 2048 * 10944  # one dense layer
    assert counts["shared_experts"] == 27 * 3 * 2048 * 2816


def test_param_counts_equal_the_built_model():
    from megatron_ext.model import transformer_config
    from megatron_ext.multirank import run_on_ranks

    args = parse_args(
        "--cpu --mock-data --train-iters 1 --model tiny-deepseek --moe-shared-expert-gate".split(),
        1,
    )
    built = run_on_ranks(_count_built, 1, args=(args,))[0]
    counts = param_counts(PRESETS["tiny-deepseek"])
    gates = 3 * 64  # --moe-shared-expert-gate: [1, H] per MoE layer (not in the preset)
    assert built == counts["total"] + gates
    assert transformer_config(args).moe_ffn_hidden_size == 64


def _count_built(args):
    from megatron.core import parallel_state as ps

    from megatron_ext.model import transformer_config
    from megatron_ext.model.builder import build_model

    ps.initialize_model_parallel()
    (model,) = build_model(args, transformer_config(args))
    return sum(p.numel() for p in model.parameters())


def test_deepseek_preset_fills_megatron_flags():
    args = parse_args("--mock-data --train-iters 1 --model deepseek-moe-16b --cpu".split(), 8)
    assert args.moe_ffn_hidden_size == 1408 and args.ffn_hidden_size == 10944
    assert args.moe_shared_expert_intermediate_size == 2816 and args.moe_router_topk == 6
    assert args.moe_layer_freq == [0] + [1] * 27 and args.moe_router_pre_softmax
    assert args.moe_layer_pattern == (False,) + (True,) * 27
    assert args.num_query_groups == 16 and args.rotary_base == 1e4


def test_router_flags_reach_the_config():
    from megatron_ext.model import transformer_config

    argv = (
        BASE
        + (
            "--moe-router-topk-scaling-factor 2.5 --moe-router-num-groups 2"
            " --moe-router-group-topk 1"
            " --moe-router-dtype fp64 --moe-router-load-balancing-type global_aux_loss"
            " --moe-expert-capacity-factor 1.25 --moe-token-drop-policy position"
            " --moe-pad-expert-input-to-capacity --moe-router-pre-softmax"
        ).split()
    )
    cfg = transformer_config(parse_args(argv, 1))
    assert (cfg.moe_router_topk_scaling_factor, cfg.moe_router_num_groups) == (2.5, 2)
    assert (cfg.moe_router_group_topk, cfg.moe_router_dtype) == (1, "fp64")
    assert cfg.moe_router_load_balancing_type == "global_aux_loss"
    assert (cfg.moe_expert_capacity_factor, cfg.moe_token_drop_policy) == (1.25, "position")
    assert cfg.moe_pad_expert_input_to_capacity and cfg.moe_router_pre_softmax
    assert cfg.moe_ffn_hidden_size == cfg.ffn_hidden_size == 128  # default: --ffn-hidden-size
    mixtral = transformer_config(parse_args(BASE, 1))
    assert mixtral.moe_expert_capacity_factor is None  # dropless by default
    assert mixtral.moe_router_load_balancing_type == "aux_loss"


@pytest.mark.parametrize(
    "extra,names",
    [
        ("--moe-router-num-groups 2", ["--moe-router-num-groups", "--moe-router-group-topk"]),
        ("--moe-router-num-groups 3 --moe-router-group-topk 1", ["--num-experts 4"]),
        ("--moe-router-num-groups 2 --moe-router-group-topk 2 --moe-router-topk 1",
         ["--moe-router-topk 1"]),
        ("--moe-pad-expert-input-to-capacity", ["--moe-expert-capacity-factor"]),
        ("--moe-shared-expert-gate", ["--moe-shared-expert-intermediate-size"]),
        ("--moe-ffn-hidden-size 33 --tensor-model-parallel-size 2",
         ["--moe-ffn-hidden-size 33", "--tensor-model-parallel-size 2"]),
        ("--moe-layer-freq [0,1,1]", ["--moe-layer-freq", "--num-layers is 2"]),
        ("--moe-layer-freq [0,0]", ["leaves no MoE layer"]),
        ("--moe-expert-capacity-factor 0", ["--moe-expert-capacity-factor"]),
    ],
)  # fmt: skip
def test_bad_moe_flags_fail_before_any_build_naming_them(extra, names):
    with pytest.raises(LayoutError) as err:
        parse_args(BASE + extra.split(), 2)
    for name in names:
        assert name in str(err.value)


def test_force_load_balancing_and_capacity_are_said_loudly():
    args = parse_args(
        BASE + "--moe-router-force-load-balancing --moe-expert-capacity-factor 1".split(), 1
    )
    text = "\n".join(args.notices)
    assert "WARNING --moe-router-force-load-balancing" in text and "RANDOM" in text
    assert "dropped" in text
    args = parse_args(BASE + "--moe-shared-expert-intermediate-size 64 "
                      "--moe-shared-expert-overlap".split(), 1)  # fmt: skip
    assert any("--moe-shared-expert-overlap" in n for n in args.unhonoured)


def test_mixtral_export_refuses_what_its_format_cannot_hold():
    from megatron_ext.convert.core import arch_from_checkpoint
    from megatron_ext.convert.hf import ConversionError

    common = {"arch": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                           num_query_groups=2, num_experts=4, moe_router_topk=2, vocab_size=1000,
                           normalization="RMSNorm", swiglu=True,
                           position_embedding_type="rope")}  # fmt: skip
    assert arch_from_checkpoint(common).ffn_hidden_size == 128
    common["arch"]["moe_ffn_hidden_size"] = 32
    assert arch_from_checkpoint(common).ffn_hidden_size == 32  # the experts' width
    common["arch"]["moe_shared_expert_intermediate_size"] = 64
    common["arch"]["moe_layer_freq"] = [0, 1]
    with pytest.raises(ConversionError, match="no shared experts .* and no dense layers"):
        arch_from_checkpoint(common)


def test_the_run_prints_the_stack_and_its_parameter_counts():
    from megatron_ext.model.presets import describe

    args = parse_args("--mock-data --train-iters 1 --model deepseek-moe-16b --cpu".split(), 8)
    line = describe(args)
    assert line.startswith("28 layers (27 MoE, 1 dense), 64 experts of FFN 1408, top-6")
    assert "shared experts of 2816: 16.376B parameters, 2.829B active per token" in line
