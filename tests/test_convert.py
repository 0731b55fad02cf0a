"""``python -m megatron_ext.convert``: HF Mixtral <-> our checkpoints, and sparse upcycling.

Tiny random HF models are built and saved locally (nothing is downloaded). The converted
checkpoint loaded into our model (one rank, and TP2 x EP2 on four CPU ranks) gives the HF
model's logits (fp32, max abs diff <= 1e-5) and loss; converting back gives the original
tensors bit for bit, also from a checkpoint re-saved by training at TP2 x EP2 with a padded
vocabulary; memory stays bounded by a shard; an upcycled dense model computes the dense
model's logits.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from ckpt_helpers import forward, read_json, read_safetensors, reshard_hf, shard_sizes, train
from megatron.core import dist_checkpointing

from megatron_ext import checkpointing
from megatron_ext.convert import core, upcycle
from megatron_ext.convert.__main__ import main as convert_main
from megatron_ext.convert.stream import MemoryMeter
from megatron_ext.multirank import run_on_ranks

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
TINY = dict(  # the `tiny` preset's architecture
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    vocab_size=1024,
    initializer_range=0.1,
)
MIXTRAL = dict(TINY, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6)


def _save_hf(model, directory: str, shard: str) -> str:
    model.save_pretrained(directory, max_shard_size=shard)
    return directory


@pytest.fixture(scope="module")
def hf_mixtral(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL)).eval()
    directory = _save_hf(model, str(tmp_path_factory.mktemp("hf_mixtral")), "60KB")
    assert len(shard_sizes(directory)) > 5  # really sharded
    return directory, model


@pytest.fixture(scope="module")
def converted(hf_mixtral, tmp_path_factory):
    """hf-to-mcore through the real command line (a subprocess)."""
    out = str(tmp_path_factory.mktemp("mcore"))
    cmd = [sys.executable, "-m", "megatron_ext.convert", "hf-to-mcore"]
    cmd += ["--input", hf_mixtral[0], "--output", out, "--target-expert-parallel-size", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--load" in done.stdout and "--num-experts 4" in done.stdout
    return out


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 24), generator=gen)
    return tokens, torch.roll(tokens, -1, dims=1)  # labels: the next token


def _argv(load: str, flags: str, extra: str = "") -> list[str]:
    base = "--cpu --mock-data --vocab-size 1024 --seq-length 24 --train-iters 1"
    base += " --micro-batch-size 1 --global-batch-size 4 --attention-dropout 0 --hidden-dropout 0"
    return f"{base} --load {load} --finetune {flags} {extra}".split()


def _check_matches(hf_model, load: str, flags: str, world: int, extra: str = "") -> None:
    tokens, labels = _batch(hf_model.config.vocab_size)
    with torch.no_grad():
        ref = hf_model(tokens, labels=tokens)  # HF shifts the labels itself
    ours = run_on_ranks(forward, world, args=(_argv(load, flags, extra), tokens, labels))[0]
    assert ours["logits"].shape == ref.logits.shape
    assert (ours["logits"] - ref.logits).abs().max().item() <= ATOL
    loss = ours["losses"][:, :-1].mean().item()  # the last position has no next token
    assert abs(loss - ref.loss.item()) <= ATOL


def _flags(directory: str) -> str:
    from megatron_ext.convert.hf import read_config

    return read_config(directory)[1].flags()


@pytest.mark.parametrize(
    "world,layout",
    [(1, ""), (4, "--tensor-model-parallel-size 2 --expert-model-parallel-size 2")],
    ids=["one_rank", "TP2xEP2"],
)
def test_hf_to_mcore_logits_and_loss_match(hf_mixtral, converted, world, layout):
    _check_matches(hf_mixtral[1], converted, _flags(hf_mixtral[0]), world, layout)


def test_round_trip_gives_the_original_tensors(hf_mixtral, converted, tmp_path):
    out = str(tmp_path / "hf")
    assert convert_main(["mcore-to-hf", "--input", converted, "--output", out]) == 0
    original, back = read_safetensors(hf_mixtral[0]), read_safetensors(out)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    umask = os.umask(0)
    os.umask(umask)
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert shards and all(  # was 0600: safetensors' private temporary file
        os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o666 & ~umask for f in shards
    )
    reloaded = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    tokens, _ = _batch(1024)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf_mixtral[1](tokens).logits)


@pytest.mark.parametrize(
    "layout",
    [
        "--tensor-model-parallel-size 2 --expert-model-parallel-size 2",
        "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2",
    ],
    ids=["TP2xEP2", "PP2xEP2"],
)
def test_round_trip_through_training_with_padded_vocab(hf_mixtral, converted, layout, tmp_path):
    """Load on four ranks with the vocabulary padded to 2000 rows, one step at lr 0 (weights
    unchanged), save with the optimizer; mcore-to-hf of that gives the originals back."""
    save = str(tmp_path / "trained")
    extra = f"{layout} --lr 0 --min-lr 0 --make-vocab-size-divisible-by 1000 --save {save}"
    run_on_ranks(train, 4, args=(_argv(converted, _flags(hf_mixtral[0]), extra),), timeout=600)
    stored = core.stored_tensors(checkpointing.iteration_dir(save, 1))
    assert stored["embedding.word_embeddings.weight"].global_shape == (2000, 64)
    out = str(tmp_path / "hf")
    core.mcore_to_hf(save, out, max_shard_bytes=200_000)
    original, back = read_safetensors(hf_mixtral[0]), read_safetensors(out)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_bf16_finetune_starts_from_the_loaded_weights(hf_mixtral, converted, tmp_path):
    """With bf16 the optimizer keeps fp32 main params made at start-up: loading weights
    without optimizer state must refresh them (else the first step reverts to the random init).
    One step at lr 0, saved: the weights are the originals rounded to bf16."""
    save = str(tmp_path / "bf16")
    extra = f"--bf16 --lr 0 --min-lr 0 --save {save}"
    run_on_ranks(train, 1, args=(_argv(converted, _flags(hf_mixtral[0]), extra),), timeout=600)
    out = str(tmp_path / "hf")
    core.mcore_to_hf(save, out)
    original, back = read_safetensors(hf_mixtral[0]), read_safetensors(out)
    for name, tensor in original.items():
        assert back[name].dtype == torch.bfloat16
        assert torch.equal(back[name], tensor.to(torch.bfloat16)), name


# ------------------------------------------------------------------------------ memory
@pytest.fixture(scope="module")
def wide_hf(tmp_path_factory):
    """Experts dominate (2 layers x 8 experts of FFN 256, 64 KiB per expert matrix; a
    vocabulary of 256): ~3.3 MB in ~17 shards of at most 200 KB."""
    torch.manual_seed(2)
    cfg = dict(MIXTRAL, intermediate_size=256, num_local_experts=8, vocab_size=256)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg))
    saved = _save_hf(model, str(tmp_path_factory.mktemp("wide_saved")), "1MB")
    out = str(tmp_path_factory.mktemp("wide"))
    reshard_hf(saved, out, 200_000)
    return out


def test_memory_is_bounded_by_a_shard_not_the_model(wide_hf, tmp_path):
    total, largest = sum(shard_sizes(wide_hf)), max(shard_sizes(wide_hf))
    assert total > 15 * largest
    meter = MemoryMeter()
    core.hf_to_mcore(wide_hf, str(tmp_path / "mcore"), meter=meter)
    assert 0.5 * largest <= meter.peak_tensor_bytes <= 2 * largest, meter.report()

    meter = MemoryMeter()
    limit = 200_000
    core.mcore_to_hf(str(tmp_path / "mcore"), str(tmp_path / "hf"), limit, meter=meter)
    assert 0.5 * limit <= meter.peak_tensor_bytes <= 2.5 * limit, meter.report()
    assert meter.peak_tensor_bytes < total / 6
    assert max(shard_sizes(str(tmp_path / "hf"))) <= limit + 1000
    assert read_safetensors(str(tmp_path / "hf")).keys() == read_safetensors(wide_hf).keys()


def test_memory_meter_sees_what_is_held():
    meter = MemoryMeter()
    held = torch.ones(1_000_000)  # noqa: F841  (kept alive on purpose)
    meter.sample()
    assert meter.peak_tensor_bytes >= 4_000_000


# --------------------------------------------------------------------------- Qwen2-MoE
QWEN2 = dict(TINY, intermediate_size=176, moe_intermediate_size=32, num_experts=8,
             num_experts_per_tok=2, shared_expert_intermediate_size=64, norm_topk_prob=False,
             qkv_bias=False, rope_theta=1e6)  # fmt: skip


@pytest.fixture(scope="module")
def hf_qwen2(tmp_path_factory):
    torch.manual_seed(6)
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**QWEN2)).eval()
    directory = _save_hf(model, str(tmp_path_factory.mktemp("hf_qwen2")), "60KB")
    return directory, model


@pytest.mark.parametrize(
    "world,layout", [(1, ""), (2, "--expert-model-parallel-size 2")], ids=["one_rank", "EP2"]
)
def test_qwen2_moe_in_and_out(hf_qwen2, world, layout, tmp_path):
    """HF Qwen2MoeForCausalLM (fine-grained experts, gated shared expert, top-k weights not
    renormalised) -> ours: the same logits; ours -> HF: the same model again."""
    src, model = hf_qwen2
    out = str(tmp_path / "mcore")
    arch = core.hf_to_mcore(src, out, targets=(1, 1, 2))
    assert (arch.moe_ffn_hidden_size, arch.moe_shared_expert_intermediate_size) == (32, 64)
    assert arch.moe_router_pre_softmax and arch.moe_shared_expert_gate
    _check_matches(model, out, arch.flags(), world, layout)
    if world > 1:
        return
    hf_out = str(tmp_path / "hf")
    assert convert_main(["mcore-to-hf", "--input", out, "--output", hf_out]) == 0
    with open(os.path.join(hf_out, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "qwen2_moe" and config["qkv_bias"] is False
    back = transformers.Qwen2MoeForCausalLM.from_pretrained(hf_out).eval()
    tokens, _ = _batch(1024)
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model(tokens).logits)


def test_qwen2_moe_what_does_not_map_is_refused(hf_qwen2, tmp_path, capsys):
    src, _ = hf_qwen2
    torch.manual_seed(7)
    biased = transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(**dict(QWEN2, qkv_bias=True))
    )
    with torch.no_grad():
        biased.model.layers[0].self_attn.q_proj.bias.normal_()
    biased_dir = _save_hf(biased, str(tmp_path / "biased"), "60KB")
    cli = ["hf-to-mcore", "--input", biased_dir, "--output", str(tmp_path / "o1")]
    assert convert_main(cli) == 2
    err = capsys.readouterr().err
    assert "q_proj.bias" in err and "qkv_bias" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o1" / "iter_0000000")
    mixed = str(tmp_path / "mixed")
    _tamper(src, mixed, config={"decoder_sparse_step": 2})
    assert convert_main(["hf-to-mcore", "--input", mixed, "--output", str(tmp_path / "o2")]) == 2
    assert "decoder_sparse_step" in capsys.readouterr().err


# ----------------------------------------------------------------------------- upcycling
@pytest.mark.parametrize(
    "kind,world,layout",
    [("Mistral", 1, ""), ("Llama", 2, "--expert-model-parallel-size 2")],
)
def test_upcycled_model_computes_the_dense_model(kind, world, layout, tmp_path):
    torch.manual_seed(3)
    config = getattr(transformers, f"{kind}Config")(**TINY, rope_theta=1e4)
    dense = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    src = _save_hf(dense, str(tmp_path / "dense"), "60KB")
    out = str(tmp_path / "moe")
    if kind == "Mistral":  # through the command line
        cli = ["upcycle", "--input", src, "--output", out, "--num-experts", "4", "--seed", "5"]
        assert convert_main([*cli, "--moe-router-topk", "2"]) == 0
        path = checkpointing.iteration_dir(out, 0)
        arch = core.arch_from_checkpoint(dist_checkpointing.load_common_state_dict(path))
    else:
        arch = upcycle.upcycle(src, out, num_experts=4, topk=2, seed=5)
    assert (arch.num_experts, arch.moe_router_topk, arch.rotary_base) == (4, 2, 1e4)
    _check_matches(dense, out, arch.flags(), world, layout)

    hf_out = str(tmp_path / "hf")
    core.mcore_to_hf(out, hf_out)
    moe, dense_sd = read_safetensors(hf_out), read_safetensors(src)
    for n in range(2):
        p = f"model.layers.{n}."
        for e in range(4):
            for w, d in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                got = moe[f"{p}block_sparse_moe.experts.{e}.{w}.weight"]
                assert torch.equal(got, dense_sd[f"{p}mlp.{d}_proj.weight"])
        gate = moe[f"{p}block_sparse_moe.gate.weight"]
        assert gate.shape == (4, 64) and 0.015 < gate.std().item() < 0.025


@pytest.mark.parametrize(
    "method,experts,topk,extra",
    [
        ("partition", 4, 4, dict(order="random")),
        ("partition", 3, 3, dict(order="contiguous", shared_groups=1)),
        ("copy", 4, 2, dict(granularity=2)),
    ],
    ids=["partition-random", "partition-shared", "copy-granularity2"],
)
def test_fine_grained_upcycling_computes_the_dense_model(method, experts, topk, extra, tmp_path):
    """LLaMA-MoE partitioning and granular copies: at step 0 (zero / repeated router rows and
    the printed --moe-router-topk-scaling-factor) the logits are the dense model's."""
    torch.manual_seed(4)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, rope_theta=1e4)).eval()
    src = _save_hf(dense, str(tmp_path / "dense"), "60KB")
    out = str(tmp_path / "moe")
    arch = upcycle.upcycle(src, out, experts, topk, seed=9, method=method, **extra)
    groups = experts + extra.get("shared_groups", 0)
    width = 128 // (groups if method == "partition" else extra["granularity"])
    assert arch.moe_ffn_hidden_size == width
    assert arch.moe_router_topk_scaling_factor == (experts if method == "partition" else 2)
    _check_matches(dense, out, arch.flags(), 1)
    # The experts' neurons: a partition covers every dense neuron once, in sorted groups.
    stored = run_on_ranks(_stored_mlp, 1, args=(checkpointing.iteration_dir(out, 0),))[0]
    w13, w2 = stored["fc1"][0], stored["fc2"][0]  # layer 0: [E, 2Fe, H], [E, H, Fe]
    gate = dense.model.layers[0].mlp.gate_proj.weight.detach()
    down = dense.model.layers[0].mlp.down_proj.weight.detach()
    rows = [torch.cat([gate[i] for i in range(128) if torch.equal(gate[i], r)]) for r in w13[0,
            :width]]  # fmt: skip
    assert len(rows) == width
    if method == "partition":
        parts = [w2[e] for e in range(experts)]
        if "shared" in stored:
            parts.append(stored["shared_fc2"][0])
        assert torch.equal(torch.cat(parts, dim=1).sort(dim=1).values, down.sort(dim=1).values)
        assert torch.count_nonzero(stored["router"][0]) == 0
    else:  # expert e = segment e mod 2; experts 2j, 2j+1 share a router row
        assert torch.equal(w2[1], down[:, 64:]) and torch.equal(w2[2], down[:, :64])
        router = stored["router"][0]
        assert torch.equal(router[0], router[1]) and not torch.equal(router[1], router[2])


def _stored_mlp(path):
    from megatron.core import dist_checkpointing

    from megatron_ext.convert import hf

    state = dist_checkpointing.load_plain_tensors(path)
    out = {
        "fc1": state[hf.FC1],
        "fc2": state[hf.FC2],
        "router": state["decoder.layers.mlp.router.weight"],
    }
    if "decoder.layers.mlp.shared_experts.linear_fc2.weight" in state:
        out["shared"] = True
        out["shared_fc2"] = state["decoder.layers.mlp.shared_experts.linear_fc2.weight"]
    return out


def test_training_runs_from_a_partitioned_model(tmp_path):
    torch.manual_seed(5)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, rope_theta=1e4))
    src = _save_hf(dense, str(tmp_path / "dense"), "60KB")
    out = str(tmp_path / "moe")
    arch = upcycle.upcycle(src, out, 4, 2, method="partition", shared_groups=0)
    argv = _argv(out, arch.flags(), "--train-iters 3 --lr 1e-3 --expert-model-parallel-size 2")
    argv[argv.index("--train-iters") + 1] = "3"
    losses = run_on_ranks(_train, 2, args=(argv,))[-1]
    assert len(losses) == 3 and all(x == x for x in losses) and losses[-1] < losses[0] + 0.5


def _train(argv):
    import pretrain_mixtral

    return pretrain_mixtral.run(argv)


# ---------------------------------------------------------------------------------- errors
def _tamper(src: str, dst: str, config=None, tensor=None):
    """A copy of the HF checkpoint ``src`` with config.json fields changed, or one tensor
    replaced (name -> new tensor)."""
    shutil.copytree(src, dst)
    if config:
        path = os.path.join(dst, "config.json")
        cfg = read_json(path)
        cfg.update(config)
        with open(path, "w") as f:
            json.dump(cfg, f)
    if tensor:
        from safetensors.torch import save_file

        tensors = read_safetensors(dst)
        tensors.update(tensor)
        for name in os.listdir(dst):
            if name.endswith(".safetensors") or name.endswith(".index.json"):
                os.remove(os.path.join(dst, name))
        save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


@pytest.mark.parametrize("case", ["config says a bigger FFN", "a tensor has extra rows"])
def test_shapes_that_disagree_with_config_json_are_refused(hf_mixtral, case, tmp_path, capsys):
    """Regression: the first case wrote an unloadable checkpoint and exited 0; the second
    raised a traceback and left iter_0000000.partial behind."""
    src = str(tmp_path / "src")
    if case == "config says a bigger FFN":
        _tamper(hf_mixtral[0], src, config={"intermediate_size": 256})
        name, want = "block_sparse_moe.experts.", "intermediate_size 256"
    else:
        q = read_safetensors(hf_mixtral[0])["model.layers.0.self_attn.q_proj.weight"]
        extra = {"model.layers.0.self_attn.q_proj.weight": torch.cat([q, q[:4]])}
        _tamper(hf_mixtral[0], src, tensor=extra)
        name, want = "model.layers.0.self_attn.q_proj.weight has shape (68, 64)", "(64, 64)"
    out = str(tmp_path / "out")
    assert convert_main(["hf-to-mcore", "--input", src, "--output", out]) == 2
    err = capsys.readouterr().err
    assert name in err and want in err and ".safetensors" in err, err
    assert err.count("\n") == 1  # one line, no traceback
    assert checkpointing.read_marker(out) is None and os.listdir(out) == []


def test_errors_are_reported_not_raised(hf_mixtral, tmp_path, capsys):
    dense = str(tmp_path / "dense")
    torch.manual_seed(4)
    _save_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)), dense, "1MB")
    assert convert_main(["hf-to-mcore", "--input", dense, "--output", str(tmp_path / "x")]) == 2
    assert "use `upcycle`" in capsys.readouterr().err

    broken = str(tmp_path / "broken")
    shutil.copytree(hf_mixtral[0], broken)
    index = read_safetensors(broken)
    os.remove(os.path.join(broken, "model.safetensors.index.json"))
    del index["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    from safetensors.torch import save_file

    for name in os.listdir(broken):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(broken, name))
    save_file(index, os.path.join(broken, "model.safetensors"))
    out = str(tmp_path / "y")
    assert convert_main(["hf-to-mcore", "--input", broken, "--output", out]) == 2
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in capsys.readouterr().err
    assert checkpointing.read_marker(out) is None  # nothing published

    args = ["hf-to-mcore", "--input", hf_mixtral[0], "--output", out]
    assert convert_main([*args, "--target-expert-parallel-size", "3"]) == 2
    assert "EP 3 must divide the 4 experts" in capsys.readouterr().err
