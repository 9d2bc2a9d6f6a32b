"""Benchmark the fused fc + relu² MLP against the eager reference and its torch.compile.

PR #1579 shape by default: 65,536 tokens per micro-batch, 736 -> 2944 -> 736, bf16 activations with fp32
master weights (the model under autocast), relu² and LeakyReLU(0.5)². Times forward and forward+backward
(median of do_bench) and the peak extra memory of one forward+backward; prints a table, writes
bench/plots/mlp.{csv,png}.
Usage: python bench/mlp.py [--tokens N] [--dim D] [--hidden H]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from common.fwd_bwd import measure, report, require_cuda  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--dim", type=int, default=736)
    parser.add_argument("--hidden", type=int, default=2944)
    args = parser.parse_args()
    require_cuda("bench/mlp.py")

    import kernels
    from kernels import reference

    torch.manual_seed(0)
    M, d, H = args.tokens, args.dim, args.hidden
    h = torch.randn(M, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    fc = (torch.randn(H, d, device="cuda") / d ** 0.5).requires_grad_()
    proj = (torch.randn(d, H, device="cuda") / H ** 0.5).requires_grad_()
    grad = torch.randn(M, d, device="cuda", dtype=torch.bfloat16)
    impls = {
        "eager": reference.relu2_mlp,
        "torch.compile": torch.compile(reference.relu2_mlp, fullgraph=True),
        "triton (ours)": kernels.relu2_mlp,
    }
    rows = []
    for slope, act in ((0.0, "relu2"), (0.5, "leaky0.5^2")):
        outs = {}
        for name, fn in impls.items():
            out = fn(h, fc, proj, slope)
            out.backward(grad)
            outs[name] = (out.detach(), h.grad, fc.grad, proj.grad)
            h.grad = fc.grad = proj.grad = None
        for name, got in outs.items():
            errs = [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, outs["eager"])]
            print(f"{act:<11} {name:<16} rel. diff vs eager (out, dh, dW_fc, dW_proj): "
                  + ", ".join(f"{e:.2e}" for e in errs))
        case = f"{act} M={M} {d}->{H}"
        rows += [{"case": case, "impl": name,
                  **measure(lambda fn=fn: fn(h, fc, proj, slope), [h, fc, proj], grad)}
                 for name, fn in impls.items()]
    report("mlp", "relu² MLP, forward+backward (bf16 activations, fp32 weights)", rows)


if __name__ == "__main__":
    main()
