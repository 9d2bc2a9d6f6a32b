"""Benchmark the fused softcapped cross-entropy against the eager reference and its torch.compile.

PR #1579 shape by default: 65,536 tokens per micro-batch, d 736, V 8192, bf16 hidden states and a bf16
tied embedding (the seed's tok_emb). Times forward and forward+backward (median of do_bench) and the peak
extra memory of one forward+backward; prints a table, writes bench/plots/cross_entropy.{csv,png}.
Usage: python bench/cross_entropy.py [--tokens N] [--dim D] [--vocab V]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from common.fwd_bwd import measure, report, require_cuda  # noqa: E402

SOFTCAP = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--dim", type=int, default=736)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    require_cuda("bench/cross_entropy.py")

    import kernels
    from kernels import reference

    torch.manual_seed(0)
    N, d, V = args.tokens, args.dim, args.vocab
    hidden = torch.randn(N, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, d, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    grad = torch.tensor(1.0, device="cuda")
    impls = {
        "eager": reference.softcapped_cross_entropy,
        "torch.compile": torch.compile(reference.softcapped_cross_entropy, fullgraph=True),
        "triton (ours)": kernels.softcapped_cross_entropy,
    }
    results = {}
    for name, fn in impls.items():
        loss = fn(hidden, weight, targets, SOFTCAP)
        loss.backward()
        results[name] = (loss.detach(), hidden.grad, weight.grad)
        hidden.grad = weight.grad = None
    ref = results["eager"]
    for name, (loss, dh, dw) in results.items():
        print(f"{name:<16} loss {loss.item():.6f}  |dh - eager|/|eager| "
              f"{float((dh.float() - ref[1].float()).norm() / ref[1].float().norm()):.2e}  |dW - eager|/|eager| "
              f"{float((dw.float() - ref[2].float()).norm() / ref[2].float().norm()):.2e}")

    case = f"N={N} d={d} V={V}"
    rows = [{"case": case, "impl": name,
             **measure(lambda fn=fn: fn(hidden, weight, targets, SOFTCAP), [hidden, weight], grad)}
            for name, fn in impls.items()]
    report("cross_entropy", "Softcapped cross-entropy, forward+backward (bf16)", rows)


if __name__ == "__main__":
    main()
