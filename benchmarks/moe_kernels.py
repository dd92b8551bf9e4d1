# SPDX-License-Identifier: Apache-2.0
"""Which kernel should compute a Read-ME MLP on CPU? One layer of SmolLM2's
shapes (hidden 576; by default the default build's 1280 shared channels
and 4 experts of 64; --shared/--experts/--expert-channels for others), timed per layer
over 30 layers' worth of distinct weights with the caches flushed between
repetitions, so every weight comes from DRAM as in a real decode step.

Routed experts (top-1, random routes):
  * vllm_grouped_gemm: vLLM's CPU grouped GEMM (_C.cpu_fused_moe), weights
    prepacked; the path the plugin uses on CPU.
  * onednn_per_expert: tokens sorted by expert, one oneDNN GEMM pair per
    expert present (vLLM's dense-linear kernel).
  * torch_bmm: tokens scattered into [experts, max tokens, hidden], two bmm.
  * torch_grouped_mm: torch._grouped_mm on tokens sorted by expert.
Shared part: shared_onednn, two oneDNN GEMMs (the plugin's shared MLP).
Fusion: fused_shared_as_experts, the shared part cut into expert-sized
"experts" every token uses plus its own expert, one grouped-GEMM call (with
1280 shared channels and experts of 64: 20 chunks, top-21).
Reference: dense_mlp_onednn, SmolLM2's dense 1536-channel MLP.

    python benchmarks/moe_kernels.py [--dtype auto|bfloat16|float32]
    python benchmarks/moe_kernels.py --shared 1024 --experts 8 --expert-channels 64   # another shape

The default dtype is the machine's native one (vllm_readme/precision.py):
bf16 on a CPU with AVX512-BF16/AMX, fp32 elsewhere, where bf16 is emulated.

Writes benchmarks/results/moe_kernels.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
H, ID, LAYERS = 576, 1536, 30  # SmolLM2's hidden size, dense MLP channels, layers
SHAPE = {"shared": 1280, "experts": 4, "expert_channels": 64}  # the default build's


def main() -> None:
    import vllm._custom_ops as ops

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="auto (default): bfloat16 where the CPU computes it natively (AVX512-BF16/AMX), else float32",
    )
    parser.add_argument("--shared", type=int, default=SHAPE["shared"], help="shared channels (default %(default)s)")
    parser.add_argument("--experts", type=int, default=SHAPE["experts"], help="routed experts (default %(default)s)")
    parser.add_argument(
        "--expert-channels",
        type=int,
        default=SHAPE["expert_channels"],
        help="channels per routed expert (default %(default)s)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "moe_kernels.json")
    args = parser.parse_args()
    from vllm_readme.precision import machine_description, resolve_precision

    IE, E, IS = args.expert_channels, args.experts, args.shared  # noqa: N806 (matrix-shape names)
    if IS % IE:
        raise SystemExit(f"--shared {IS} must be a multiple of --expert-channels {IE} (it is cut into such chunks)")

    precision = resolve_precision(args.dtype, device="cpu")  # vLLM's CPU kernels
    args.dtype, dtype = precision.vllm_dtype, precision.dtype
    machine = machine_description(precision=precision)
    print(f"[moe_kernels] {machine}", flush=True)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    isa = "vec"
    w13 = [rand(E, 2 * IE, H) for _ in range(LAYERS)]
    w2 = [rand(E, H, IE) for _ in range(LAYERS)]
    packed13 = [ops.cpu_prepack_moe_weight(w, isa) for w in w13]
    packed2 = [ops.cpu_prepack_moe_weight(w, isa) for w in w2]
    dnn13 = [[ops.create_onednn_mm(w[e].t(), 32) for e in range(E)] for w in w13]
    dnn2 = [[ops.create_onednn_mm(w[e].t(), 32) for e in range(E)] for w in w2]
    w13t = [w.transpose(1, 2).contiguous() for w in w13]
    w2t = [w.transpose(1, 2).contiguous() for w in w2]
    shared_gu = [ops.create_onednn_mm(rand(2 * IS, H).t(), 32) for _ in range(LAYERS)]
    shared_d = [ops.create_onednn_mm(rand(H, IS).t(), 32) for _ in range(LAYERS)]
    dense_gu = [ops.create_onednn_mm(rand(2 * ID, H).t(), 32) for _ in range(LAYERS)]
    dense_d = [ops.create_onednn_mm(rand(H, ID).t(), 32) for _ in range(LAYERS)]
    chunks = IS // IE
    fused13 = [ops.cpu_prepack_moe_weight(torch.cat([rand(chunks, 2 * IE, H), w]), isa) for w in w13]
    fused2 = [ops.cpu_prepack_moe_weight(torch.cat([rand(chunks, H, IE), w]), isa) for w in w2]
    flush = torch.ones(64 << 20, dtype=torch.float32)  # 256 MB, far above the last-level cache

    def per_layer_us(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            flush.add_(1)
            start = time.perf_counter()
            for layer in range(LAYERS):
                fn(layer)
            best = min(best, time.perf_counter() - start)
        return best / LAYERS * 1e6

    def act(gate_up: torch.Tensor) -> torch.Tensor:
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=dtype)
        torch.ops._C.silu_and_mul(out, gate_up)
        return out

    results = {
        "dtype": args.dtype,
        "machine": machine,
        "threads": torch.get_num_threads(),
        "shape": {"hidden": H, "shared": IS, "experts": E, "expert_channels": IE},
        "us_per_layer": {},
    }

    def bench_batch(m: int) -> dict[str, float]:
        x = rand(m, H) * 50
        ids = torch.randint(0, E, (m, 1), generator=g).to(torch.int32)
        ones = torch.ones(m, 1)
        flat = ids.view(-1).long()

        def vllm_grouped_gemm(layer):
            out = torch.empty(m, H, dtype=dtype)
            ops.cpu_fused_moe(out, x, packed13[layer], packed2[layer], None, None, ones, ids, "silu", isa, False)
            return out

        def onednn_per_expert(layer):
            out = torch.empty(m, H, dtype=dtype)
            for e in flat.unique().tolist():
                rows = (flat == e).nonzero().view(-1)
                out[rows] = ops.onednn_mm(dnn2[layer][e], act(ops.onednn_mm(dnn13[layer][e], x[rows], None)), None)
            return out

        def torch_bmm(layer):
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=E)
            rank = torch.arange(m) - (torch.cumsum(counts, 0) - counts)[flat[order]]
            padded = x.new_zeros(E, int(counts.max()), H)
            padded[flat[order], rank] = x[order]
            hidden = torch.bmm(padded, w13t[layer])
            y = torch.bmm(act(hidden.view(-1, 2 * IE)).view(E, -1, IE), w2t[layer])
            out = torch.empty_like(x)
            out[order] = y[flat[order], rank]
            return out

        def torch_grouped_mm(layer):
            order = torch.argsort(flat, stable=True)
            offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
            y = torch._grouped_mm(act(torch._grouped_mm(x[order], w13t[layer], offs=offs)), w2t[layer], offs=offs)
            out = torch.empty_like(x)
            out[order] = y
            return out

        def shared_onednn(layer):
            return ops.onednn_mm(shared_d[layer], act(ops.onednn_mm(shared_gu[layer], x, None)), None)

        fused_ids = torch.cat([torch.arange(chunks).expand(m, chunks), ids + chunks], 1).to(torch.int32).contiguous()
        fused_ones = torch.ones(m, chunks + 1)

        def fused_shared_as_experts(layer):
            out = torch.empty(m, H, dtype=dtype)
            ops.cpu_fused_moe(
                out, x, fused13[layer], fused2[layer], None, None, fused_ones, fused_ids, "silu", isa, False
            )
            return out

        def dense_mlp_onednn(layer):
            return ops.onednn_mm(dense_d[layer], act(ops.onednn_mm(dense_gu[layer], x, None)), None)

        reference = vllm_grouped_gemm(0).float()
        row = {}
        for fn in (vllm_grouped_gemm, onednn_per_expert, torch_bmm, torch_grouped_mm):
            error = (fn(0).float() - reference).abs().max().item()
            if error > 0.05 * reference.abs().max().item():
                raise AssertionError(f"{fn.__name__} disagrees with the grouped GEMM by {error}")
            row[fn.__name__] = per_layer_us(fn)
        for fn in (shared_onednn, fused_shared_as_experts, dense_mlp_onednn):
            row[fn.__name__] = per_layer_us(fn)
        row["split_total (grouped GEMM + shared oneDNN)"] = row["vllm_grouped_gemm"] + row["shared_onednn"]
        return row

    for m in args.batches:
        row = results["us_per_layer"][str(m)] = bench_batch(m)
        print(
            f"[moe_kernels] {args.dtype} batch {m}: " + ", ".join(f"{k} {v:.0f}us" for k, v in row.items()), flush=True
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"[moe_kernels] wrote {args.out}")


if __name__ == "__main__":
    main()
