"""CPU rehearsals of the cluster recipes: the shrunk flags keep the degrees, errors surface early,
and the 8x7B recipe really trains at its TP/PP/VPP/EP on CPU ranks."""

import io
import math
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from megatron_ext.arguments import parse_args
from megatron_ext.plan.recipe import load, strip_flags
from megatron_ext.plan.rehearse import main as rehearse_main
from megatron_ext.plan.rehearse import shrink

ROOT = Path(__file__).resolve().parents[1]
R8X7B = str(ROOT / "examples/mixtral_8x7b_64xh100.sh")
R8X22B = str(ROOT / "examples/mixtral_8x22b_128xh100.sh")


def _degrees(args):
    return (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.virtual_pipeline_model_parallel_size,
        args.expert_model_parallel_size,
        args.expert_tensor_parallel_size,
        args.data_parallel_size,
    )


@pytest.mark.parametrize(
    "path, world, degrees, micro_batches",
    [(R8X7B, 32, (1, 4, 8, 8, 1, 8), 16), (R8X22B, 64, (2, 8, 7, 8, 1, 4), 32)],
)
def test_shrink_keeps_the_parallel_degrees(path, world, degrees, micro_batches):
    recipe = load(path)
    reh = shrink(recipe)
    assert reh.world_size == world
    args = parse_args(reh.argv, world)
    assert _degrees(args) == degrees
    assert args.num_microbatches == micro_batches  # same schedule as on the cluster
    assert args.cpu and args.mock_data and args.save is None and args.load is None
    assert args.hidden_size == 64 and args.seq_length == 64
    full = parse_args(recipe.argv, recipe.world_size)
    assert (args.bf16, args.lr, args.adam_beta2) == (full.bf16, full.lr, full.adam_beta2)


def test_shrink_says_what_it_changed():
    changes = "\n".join(shrink(load(R8X22B)).changes)
    assert "CPU layout TP2 PP8 VPP7 EP8 ETP1 DP4 on 64 ranks" in changes
    assert "DP 8 -> 4 (the smallest EP 8 ETP1 allows)" in changes
    assert "dropped --save" in changes and "--sequence-parallel" not in changes
    changes = "\n".join(shrink(load(R8X7B)).changes)
    assert "DP 16 -> 8 (the smallest EP 8 allows); global batch 256 -> 128" in changes


def test_strip_flags_knows_each_flags_values():
    argv = ["--data-path", "1", "a", "0.5", "b", "--bf16", "--save", "x", "--lr", "1e-4"]
    kept, removed = strip_flags(argv, {"--data-path", "--save"})
    assert kept == ["--bf16", "--lr", "1e-4"]
    assert removed == ["--data-path", "1", "a", "0.5", "b", "--save", "x"]


def _rehearse(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = rehearse_main(list(argv))
        except SystemExit as e:  # argparse errors from the training script's parser
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _variant(tmp_path, old: str, new: str) -> str:
    text = Path(R8X7B).read_text()
    assert old in text
    path = tmp_path / "recipe.sh"
    path.write_text(text.replace(old, new))
    return str(path)


def test_bad_layout_is_caught_before_anything_runs(tmp_path):
    bad = _variant(tmp_path, "--expert-model-parallel-size 8", "--expert-model-parallel-size 3")
    code, _, err = _rehearse(bad)
    assert code == 2
    assert "layout error at 64 GPUs: --expert-model-parallel-size 3 x expert-TP 1" in err


def test_unknown_flag_is_caught(tmp_path):
    bad = _variant(tmp_path, "--moe-grouped-gemm", "--moe-grouped-gemms")
    code, _, err = _rehearse(bad)
    assert code == 2 and "unrecognized arguments: --moe-grouped-gemms" in err


def test_rehearsal_with_fewer_experts_ranks(tmp_path):
    """The quick variant (EP 1: 4 ranks) runs the real training script for one iteration."""
    code, out, err = _rehearse(R8X7B, "--train-iters", "1", "--expert-parallel", "1")
    assert code == 0, out + err
    assert "EP 8 -> 1" in out and "rehearsal passed: 1 iterations on 4 CPU ranks" in out


@pytest.mark.slow
def test_rehearse_the_8x7b_recipe_at_its_degrees():
    """TP1 PP4 VPP8 EP8 (DP 8): 32 CPU ranks, one iteration of 16 micro-batches."""
    code, out, err = _rehearse(R8X7B, "--train-iters", "1", "--timeout", "600")
    assert code == 0, out + err
    assert "CPU layout TP1 PP4 VPP8 EP8 DP8 on 32 ranks" in out
    line = next(x for x in out.splitlines() if x.startswith("rehearsal passed"))
    assert "1 iterations on 32 CPU ranks" in line
    loss = float(line.rsplit("loss", 1)[1])
    assert math.isfinite(loss) and 6.0 < loss < 8.0  # ~ln(1024) = 6.93 at initialisation
