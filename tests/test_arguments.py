"""Megatron-LM's Mixtral 8x7B flags parse into the 8x7B architecture; bad layouts fail early."""

import re

import pytest

from megatron_ext.arguments import LayoutError, parse_args
from megatron_ext.model import PRESETS

# The flags of Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh at 8x7B size
# (its 64-GPU mapping: TP1 PP4 EP8), written exactly as a user would pass them.
MEGATRON_8X7B = """
--use-mcore-models --disable-bias-linear --seq-length 4096 --max-position-embeddings 32768
--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
--init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm
--position-embedding-type rope --swiglu --untie-embeddings-and-output-weights
--group-query-attention --num-query-groups 8 --no-masked-softmax-fusion --no-position-embedding
--rotary-base 1000000
--num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss
--moe-aux-loss-coeff 1e-2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall
--overlap-param-gather --overlap-grad-reduce
--tokenizer-type Llama2Tokenizer --tokenizer-model /data/tokenizer.model
--data-path /data/my-mixtral_text_document --split 99990,8,2
--micro-batch-size 1 --global-batch-size 256 --lr 1e-4 --train-iters 500000
--lr-decay-iters 320000 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 0.1
--lr-warmup-iters 500 --clip-grad 1.0 --bf16
--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 --expert-model-parallel-size 8
--use-distributed-optimizer --sequence-parallel
--log-interval 1 --save-interval 10000 --eval-interval 1000 --eval-iters 10
--save /ckpt --load /ckpt --tensorboard-dir /ckpt/tensorboard --no-load-optim --no-load-rng
--num-layers-per-virtual-pipeline-stage 1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8
--seed 42 --fp8-format hybrid --fp8-recipe delayed --moe-z-loss-coeff 1e-3
""".split()


def test_megatron_8x7b_flags_parse_into_8x7b():
    args = parse_args(MEGATRON_8X7B, world_size=64)
    arch = PRESETS["8x7b"]
    for field in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "num_experts",
        "moe_router_topk",
        "rotary_base",
    ):
        assert getattr(args, field) == getattr(arch, field), field
    assert args.normalization == "RMSNorm" and args.swiglu and args.disable_bias_linear
    assert args.untie_embeddings_and_output_weights
    assert args.position_embedding_type == "rope"
    assert args.data_parallel_size == 16
    assert args.virtual_pipeline_model_parallel_size == 8
    assert args.num_microbatches == 16  # 256 / (1 x 16)
    assert args.moe_aux_loss_coeff == 1e-2 and args.moe_z_loss_coeff == 1e-3
    assert (args.adam_beta2, args.lr_decay_style, args.lr_warmup_iters) == (0.95, "cosine", 500)
    assert args.data_path == ["/data/my-mixtral_text_document"]
    # Megatron-LM switches sequence parallel off at TP1; we do too, and say so.
    assert args.sequence_parallel is False
    assert any("--sequence-parallel" in n for n in args.notices)


def test_preset_fills_architecture_and_explicit_flags_win():
    args = parse_args("--model 8x7b --num-layers 4 --mock-data --train-iters 1".split(), 1)
    assert args.hidden_size == 4096 and args.num_layers == 4
    assert any("--num-layers 4 overrides --model 8x7b" in n for n in args.notices)


def test_cpu_reports_unhonoured_flags_once():
    argv = "--model tiny --mock-data --train-iters 1 --cpu --moe-grouped-gemm --fp8-format hybrid"
    args = parse_args(argv.split(), 1)
    assert any(n.startswith("--moe-grouped-gemm") for n in args.unhonoured)
    assert any(n.startswith("--fp8-format hybrid") for n in args.unhonoured)


BASE = "--model 8x7b --mock-data --train-iters 1 --micro-batch-size 1"


@pytest.mark.parametrize(
    "extra, world, names",
    [
        ("--tensor-model-parallel-size 3", 8, ["world size 8", "--tensor-model-parallel-size 3"]),
        (
            "--expert-model-parallel-size 4",
            6,
            ["--expert-model-parallel-size 4", "the 6 ranks of a pipeline stage"],
        ),
        (
            "--expert-model-parallel-size 16",
            16,
            ["--num-experts 8", "--expert-model-parallel-size 16"],
        ),
        (
            "--pipeline-model-parallel-size 3",
            3,
            ["--num-layers 32", "--pipeline-model-parallel-size 3"],
        ),
        (
            "--pipeline-model-parallel-size 4 --num-layers-per-virtual-pipeline-stage 3",
            4,
            ["--num-layers-per-virtual-pipeline-stage 3", "8 layers per stage"],
        ),
        (
            "--tensor-model-parallel-size 16",
            16,
            ["--num-query-groups 8", "--tensor-model-parallel-size 16"],
        ),
        (
            "--tensor-model-parallel-size 64",
            64,
            ["--num-attention-heads 32", "--tensor-model-parallel-size 64"],
        ),
        (
            "--global-batch-size 6",
            4,
            ["--global-batch-size 6", "--micro-batch-size 1", "data-parallel size 4"],
        ),
        ("--bf16 --fp16", 1, ["--bf16 and --fp16"]),
    ],
)
def test_invalid_layouts_fail_before_model_build_naming_flags(extra, world, names):
    with pytest.raises(LayoutError) as err:
        parse_args((BASE + " " + extra).split(), world_size=world)
    for name in names:
        assert name in str(err.value)


def test_smoe_needs_swiglu_without_bias():
    argv = "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4"
    argv += " --num-experts 4 --seq-length 32 --mock-data --train-iters 1"
    with pytest.raises(LayoutError, match="--swiglu --disable-bias-linear"):
        parse_args(argv.split(), 1)
    args = parse_args((argv + " --swiglu --disable-bias-linear").split(), 1)
    assert args.normalization == "LayerNorm"  # Megatron-LM's default when not given


def test_main_reports_layout_error_and_exits_2(capsys):
    import pretrain_mixtral

    rc = pretrain_mixtral.main((BASE + " --expert-model-parallel-size 16").split())
    assert rc == 2
    assert "--expert-model-parallel-size 16" in capsys.readouterr().err


@pytest.mark.parametrize(
    "world,tp,etp,ep,edp",
    [(2, 1, None, 1, 2), (2, 2, 2, 1, 1), (2, 2, 1, 2, 1), (4, 2, 1, 4, 1), (8, 2, 1, 2, 4),
     (4, 1, 2, 2, 1), (4, 4, 2, 2, 1), (8, 2, 4, 2, 1)],
)  # fmt: skip
def test_expert_grid_of_megatron_core_is_accepted(world, tp, etp, ep, edp):
    """Megatron-Core's rule: EP x expert-TP divides TP x DP; expert-DP is the quotient."""
    argv = ["--model", "tiny", "--cpu", "--mock-data", "--train-iters", "1",
            "--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(ep),
            "--num-attention-heads", "4", "--num-query-groups", "4"]  # fmt: skip
    if etp is not None:
        argv += ["--expert-tensor-parallel-size", str(etp)]
    args = parse_args(argv, world_size=world)
    assert args.expert_tensor_parallel_size == (etp or tp)
    assert args.expert_data_parallel_size == edp


@pytest.mark.parametrize(
    "world,tp,etp,ep,message",
    [
        (2, 2, 1, 4, "--expert-model-parallel-size 4 x --expert-tensor-parallel-size 1 = 4 "
                     "must divide the 2 ranks of a pipeline stage"),
        (4, 2, 4, 2, "--expert-model-parallel-size 2 x --expert-tensor-parallel-size 4 = 8"),
        (6, 2, 4, 1, "--expert-model-parallel-size 1 x --expert-tensor-parallel-size 4 = 4 "
                     "must divide the 6 ranks"),
        (6, 1, 3, 1, "--moe-ffn-hidden-size 128 is not divisible by "
                     "--expert-tensor-parallel-size 3"),
    ],
)  # fmt: skip
def test_invalid_expert_grid_is_named_before_any_build(world, tp, etp, ep, message):
    argv = ["--model", "tiny", "--cpu", "--mock-data", "--train-iters", "1",
            "--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(ep),
            "--expert-tensor-parallel-size", str(etp), "--global-batch-size", "24",
            "--num-attention-heads", "4", "--num-query-groups", "4"]  # fmt: skip
    with pytest.raises(LayoutError, match=re.escape(message)):
        parse_args(argv, world_size=world)
