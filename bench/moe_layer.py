"""Forward+backward throughput of our SMoE layer against its peers, on the same shapes.

Contenders (one process, one rank, same T tokens of hidden H, E experts of FFN size F, top-K):

* ``ours``: ``megatron_ext.moe.SMoELayer``; ``ours-eager``: the same layer with its
  ``torch.compile``d functions run eagerly (on CUDA the combine's weighted sum,
  ``moe/unpermute.py``: the A/B of that fusion; on the CPU nothing is compiled);
* ``hf-mixtral``: transformers' ``MixtralSparseMoeBlock`` (its default "eager" experts);
  ``hf-mixtral-grouped_mm``: the same with ``experts_implementation="grouped_mm"``;
* ``deepspeed``: ``deepspeed.moe.layer.MoE`` with SwiGLU experts, top-K, capacity factor 1.0,
  ``drop_tokens=False`` (dropless: capacity = the busiest expert's load), no 2nd-expert sampling;
  ``deepspeed-drop`` is the same with ``drop_tokens=True`` (drops tokens: less work);
* ``megatron-core``: Megatron-Core's ``MoELayer`` (local spec: SequentialMLP experts, its
  default allgather dispatcher) under ``megatron_ext.cpu_mode`` (that mode's TorchFunctionMode
  adds a little Python per op, charged to this row only);
* ``hf-deepseek-v3`` / ``hf-qwen2-moe``: transformers' ``DeepseekV3MoE`` and
  ``Qwen2MoeSparseMoeBlock`` (fine-grained case, ``--shared-ffn``);
* ``ceiling``: the same FLOPs as a dense SwiGLU MLP on T*K rows (x W13ᵀ, silu*mul, W2ᵀ;
  autograd): what an MoE with zero routing cost would take. ``gemm-chain``: only the six GEMMs
  of that MLP's forward and backward, no elementwise work at all (a lower bound on time).

Each iteration runs every contender once, in rotating order (so load from other processes
hits all of them alike). The table gives wall-clock time (best and median over the
iterations; tokens/s = T / best) and the median process CPU time (all threads), each also as
a ratio to ours (> 1: faster than ours). On a quiet machine the wall figures are the answer;
on a shared one other processes inflate wall time at random, while CPU time (run with
``OMP_WAIT_POLICY=PASSIVE`` so that waiting threads sleep instead of spinning) stays within a
few percent. Routing is whatever the random init gives (near balanced).

    OMP_WAIT_POLICY=PASSIVE python bench/moe_layer.py --tokens 4096 --hidden 512 --ffn 1792 \\
        --experts 8 --topk 2 --iters 10 --dtype fp32 --device cpu --threads 2

Fine-grained (DeepSeek-MoE-like: 64 routed experts of FFN 224, top-6, 2 shared experts of 224;
``ceiling`` then adds a dense SwiGLU of width 448 on the T tokens, and ``ceiling-wide`` is one
dense SwiGLU of width 6*224 + 448 on the T tokens: the same FLOPs in wide GEMMs):

    OMP_WAIT_POLICY=PASSIVE python bench/moe_layer.py --tokens 4096 --hidden 512 --ffn 224 \\
        --experts 64 --topk 6 --shared-ffn 448 --iters 10 --dtype fp32 --device cpu \\
        --threads 2 --only ours hf-deepseek-v3 hf-qwen2-moe ceiling ceiling-wide
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config(a, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=a.hidden, ffn_hidden_size=a.ffn, num_attention_heads=8,
        num_moe_experts=a.experts, moe_router_topk=a.topk, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, params_dtype=DTYPES[a.dtype],
        use_cpu_initialization=a.device == "cpu", moe_router_pre_softmax=a.topk == 1,
        bf16=a.dtype == "bf16", **kw,
    )  # fmt: skip


def ours(a):
    """Our layer as the training loop runs it (``--main-grad``, the default): Megatron's DDP
    gives every parameter an fp32 ``main_grad`` that the weight-gradient GEMMs add into
    (gradient accumulation fusion, Megatron-LM's default; ``fallback_kernels`` without apex),
    zeroed before every step (DDP's ``zero_grad_buffer``; outside the timed step, like every
    contender's ``zero_grad``).
    ``--no-main-grad``: plain autograd ``.grad`` tensors, allocated at every step."""
    from megatron_ext import fallback_kernels
    from megatron_ext.moe import SMoELayer

    kw = dict(moe_shared_expert_intermediate_size=a.shared_ffn) if a.shared_ffn else {}
    kw["bias_activation_fusion"] = a.device != "cpu"  # the shared experts' SwiGLU, as training
    if a.main_grad:
        kw["gradient_accumulation_fusion"] = fallback_kernels.use_wgrad_accumulation()
    layer = SMoELayer(_config(a, **kw)).to(a.device)
    if a.main_grad:
        for p in layer.parameters():
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)
    return layer, lambda x: layer(x.view(-1, 1, a.hidden))[0]


def ours_eager(a):
    """``ours`` under ``torch.compiler.set_stance("force_eager")`` for its whole step."""
    layer, fn = ours(a)
    fn.compile_stance = "force_eager"  # read by _step
    return layer, fn


def _init_normal(block):
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)


def hf_deepseek_v3(a):
    """transformers' ``DeepseekV3MoE``: sigmoid router (one group), routed experts of FFN F,
    ``Fs / F`` shared experts."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(
        hidden_size=a.hidden, moe_intermediate_size=a.ffn, n_routed_experts=a.experts,
        num_experts_per_tok=a.topk, n_group=1, topk_group=1,
        n_shared_experts=max(a.shared_ffn // a.ffn, 1),
    )  # fmt: skip
    block = DeepseekV3MoE(cfg).to(a.device, DTYPES[a.dtype])
    _init_normal(block)
    return block, lambda x: block(x.view(1, -1, a.hidden))


def hf_qwen2_moe(a):
    """transformers' ``Qwen2MoeSparseMoeBlock``: softmax router, experts of FFN F, one gated
    shared expert of width Fs."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(
        hidden_size=a.hidden, moe_intermediate_size=a.ffn, num_experts=a.experts,
        num_experts_per_tok=a.topk, shared_expert_intermediate_size=max(a.shared_ffn, 1),
    )  # fmt: skip
    block = Qwen2MoeSparseMoeBlock(cfg).to(a.device, DTYPES[a.dtype])
    _init_normal(block)
    return block, lambda x: block(x.view(1, -1, a.hidden))


def _hf_mixtral(a, experts_implementation=None):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=a.hidden, intermediate_size=a.ffn, num_local_experts=a.experts,
        num_experts_per_tok=a.topk, experts_implementation=experts_implementation,
    )  # fmt: skip
    block = MixtralSparseMoeBlock(cfg).to(a.device, DTYPES[a.dtype])
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block, lambda x: block(x.view(1, -1, a.hidden))


def hf_mixtral(a):
    return _hf_mixtral(a)


def hf_mixtral_grouped(a):
    return _hf_mixtral(a, "grouped_mm")


class _SwiGLU(torch.nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.w13 = torch.nn.Linear(h, 2 * f, bias=False)
        self.w2 = torch.nn.Linear(f, h, bias=False)

    def forward(self, x):
        g, u = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(g) * u)


def _deepspeed(a, drop_tokens):
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo" if a.device == "cpu" else "nccl")
    moe = MoE(
        a.hidden, _SwiGLU(a.hidden, a.ffn), num_experts=a.experts, ep_size=1, k=a.topk,
        capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4,
        drop_tokens=drop_tokens, use_rts=False, top2_2nd_expert_sampling=False,
    )  # fmt: skip
    moe.set_deepspeed_parallelism()
    moe = moe.to(a.device, DTYPES[a.dtype])
    return moe, lambda x: moe(x.view(-1, a.hidden))[0]


def deepspeed_dropless(a):
    return _deepspeed(a, drop_tokens=False)


def deepspeed_drop(a):
    return _deepspeed(a, drop_tokens=True)


def megatron_core(a):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ext import cpu_mode

    # Megatron-Core 0.16.1's router gate reads `te_general_gemm`, which is left undefined when
    # Transformer Engine is absent (NameError); None is what it means to test for.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    on_cpu = a.device == "cpu"
    if on_cpu:
        cpu_mode.enable()
    spec = get_gpt_layer_local_spec(num_experts=a.experts, moe_grouped_gemm=False)
    layer = build_module(
        spec.submodules.mlp,
        config=_config(a, moe_token_dispatcher_type="allgather"),
        pg_collection=_pg_collection(),
    ).to(a.device)  # fmt: skip  (Megatron's router weight is made on the host)
    if on_cpu:
        cpu_mode.disable()

    def run(x):
        if on_cpu:
            cpu_mode.enable()
        try:
            return layer(x.view(-1, 1, a.hidden))[0]
        finally:
            if on_cpu:
                cpu_mode.disable()

    return layer, run


def _pg_collection():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    pg = get_default_pg_collection()
    from megatron.core import parallel_state as ps

    pg.dp = ps.get_data_parallel_group()
    pg.dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    return pg


def _dense_run(a, rows: int, width: int):
    """fwd+bwd of a dense SwiGLU MLP of ``width`` on ``rows`` rows of its own (autograd)."""
    dt = DTYPES[a.dtype]
    mlp = _SwiGLU(a.hidden, width).to(a.device, dt)
    x = torch.randn(rows, a.hidden, device=a.device, dtype=dt, requires_grad=True)
    dy = torch.randn(rows, a.hidden, device=a.device, dtype=dt)

    def run():
        x.grad = None
        mlp(x).backward(dy)

    return mlp, run


def ceiling(a):
    """The same FLOPs with zero routing cost, autograd: a dense SwiGLU MLP of width F on T*K
    rows (the routed experts' GEMM shapes, no replication cost), plus one of width Fs on the T
    tokens with shared experts."""
    mlp, routed = _dense_run(a, a.tokens * a.topk, a.ffn)
    parts = [routed]
    if a.shared_ffn:
        shared_mlp, shared = _dense_run(a, a.tokens, a.shared_ffn)
        parts.append(shared)
        mlp = torch.nn.ModuleList([mlp, shared_mlp])

    def run(_x):
        for part in parts:
            part()

    return mlp, run


def ceiling_wide(a):
    """The same FLOPs as ONE dense SwiGLU MLP of width K*F + Fs on the T tokens (fine-grained
    case: what the narrow experts cost against the wide GEMMs of a dense model)."""
    mlp, run = _dense_run(a, a.tokens, a.topk * a.ffn + a.shared_ffn)
    return mlp, lambda _x: run()


def gemm_chain(a):
    """The six GEMMs of a dense SwiGLU MLP on T*K rows, forward and backward, nothing else."""
    n, h, f, dt = a.tokens * a.topk, a.hidden, a.ffn, DTYPES[a.dtype]
    r = lambda *s: torch.randn(*s, device=a.device, dtype=dt)
    x, w13, w2, dy = r(n, h), r(2 * f, h), r(h, f), r(n, h)
    hid, act, dact, dhid = r(n, 2 * f), r(n, f), r(n, f), r(n, 2 * f)
    out, dx, dw13, dw2 = r(n, h), r(n, h), r(2 * f, h), r(h, f)

    def run(_x):
        torch.mm(x, w13.t(), out=hid)  # forward
        torch.mm(act, w2.t(), out=out)
        torch.mm(dy, w2, out=dact)  # backward
        torch.mm(dy.t(), act, out=dw2)
        torch.mm(dhid, w13, out=dx)
        torch.mm(dhid.t(), x, out=dw13)
        return None

    return None, run


CONTENDERS = {
    "ours": ours,
    "ours-eager": ours_eager,
    "hf-mixtral": hf_mixtral,
    "hf-mixtral-grouped_mm": hf_mixtral_grouped,
    "deepspeed": deepspeed_dropless,
    "deepspeed-drop": deepspeed_drop,
    "megatron-core": megatron_core,
    "hf-deepseek-v3": hf_deepseek_v3,
    "hf-qwen2-moe": hf_qwen2_moe,
    "ceiling": ceiling,
    "ceiling-wide": ceiling_wide,
    "gemm-chain": gemm_chain,
}


def _init_dist(device):
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    if device != "cpu":  # Megatron's experts initialise under its CUDA RNG tracker's streams
        tensor_parallel.model_parallel_cuda_manual_seed(0)


def _step(fn, x, dy):
    stance = getattr(fn, "compile_stance", None)  # forward and backward alike
    with torch.compiler.set_stance(stance) if stance else contextlib.nullcontext():
        x.grad = None
        out = fn(x)
        if out is not None:  # the ceilings run their own backward
            out.backward(dy.view_as(out))


def _zero_grads(module) -> None:
    """Every contender's ``zero_grad`` before a step, and DDP's ``zero_grad_buffer`` for
    ours (``--main-grad``)."""
    if module is None:
        return
    module.zero_grad(set_to_none=True)
    for p in module.parameters():
        if hasattr(p, "main_grad"):
            p.main_grad.zero_()


def _profile(name, run, x, dy, a) -> None:
    """``--profile``: the op table of 3 steps and, on CUDA, the host syncs of one step."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    module, fn = run
    cuda = a.device != "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            _zero_grads(module)  # its fill_ rows are outside the timing in the timed loop
            _step(fn, x, dy)
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
    syncs = "-"
    if cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _step(fn, x, dy)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        where = [f"{os.path.relpath(w.filename, REPO)}:{w.lineno}" for w in caught
                 if "synchroniz" in str(w.message)]  # fmt: skip
        syncs = f"{len(where)} ({', '.join(where)})" if where else "0"
    os.makedirs(a.profile, exist_ok=True)
    with open(os.path.join(a.profile, f"{name}.txt"), "w") as f:
        f.write(f"{name}: 3 steps; host syncs in one step: {syncs}\n{table}\n")
    print(f"# {name}: profile in {a.profile}/{name}.txt, host syncs per step: {syncs}",
          file=sys.stderr)  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1792)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--shared-ffn", type=int, default=0, help="shared experts' total width")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--main-grad", action=argparse.BooleanOptionalAction, default=True,
        help="ours with DDP-style fp32 main_grad buffers and fused weight-gradient accumulation "
        "(as in training); --no-main-grad: plain autograd grads",
    )  # fmt: skip
    p.add_argument("--only", nargs="*", choices=sorted(CONTENDERS), help="subset to run")
    p.add_argument(
        "--profile", metavar="DIR",
        help="after timing, profile 3 more steps of each contender with torch.profiler: its "
        "kernel table in DIR/<name>.txt (device time on CUDA) and, on CUDA, the host syncs of "
        "one step (torch.cuda.set_sync_debug_mode)",
    )  # fmt: skip
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    _init_dist(a.device)
    names = a.only or list(CONTENDERS)
    runs, times = {}, {}
    for name in names:
        try:
            module, fn = CONTENDERS[name](a)
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            print(f"# {name}: not run ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        runs[name], times[name] = (module, fn), []
    dt = DTYPES[a.dtype]
    x = torch.randn(a.tokens, a.hidden, device=a.device, dtype=dt, requires_grad=True)
    dy = torch.randn(a.tokens, a.hidden, device=a.device, dtype=dt)
    order = list(runs)
    for it in range(a.warmup + a.iters):
        for name in order[it % len(order) :] + order[: it % len(order)]:
            module, fn = runs[name]
            _zero_grads(module)
            if a.device != "cpu":
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            _step(fn, x, dy)
            if a.device != "cpu":
                torch.cuda.synchronize()
            if it >= a.warmup:
                times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    if a.profile:
        for name in order:
            _profile(name, runs[name], x, dy, a)
    print(
        f"T={a.tokens} H={a.hidden} F={a.ffn} E={a.experts} K={a.topk} Fs={a.shared_ffn} "
        f"{a.dtype} {a.device} "
        f"threads={a.threads} iters={a.iters} OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(default)')}\n"
    )
    print(
        "| layer | wall best (ms) | wall median (ms) | tokens/s (best wall) | vs ours (wall) "
        "| CPU time median (ms) | vs ours (CPU time) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    best = {n: min(w for w, _ in ts) for n, ts in times.items()}
    cpu = {n: statistics.median(c for _, c in ts) for n, ts in times.items()}
    for name, ts in times.items():
        med = statistics.median(w for w, _ in ts)
        r_wall = f"{best['ours'] / best[name]:.3f}" if "ours" in best else "-"
        r_cpu = f"{cpu['ours'] / cpu[name]:.3f}" if "ours" in cpu else "-"
        print(
            f"| {name} | {best[name] * 1e3:.1f} | {med * 1e3:.1f} | {a.tokens / best[name]:,.0f} "
            f"| {r_wall} | {cpu[name] * 1e3:.1f} | {r_cpu} |"
        )


if __name__ == "__main__":
    main()
