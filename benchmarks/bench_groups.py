"""Per-step overhead of several param groups: ``./run bench groups``.

AdamS validates every group's kernel call before the first one writes (so an error in a later
group cannot leave an earlier one stepped); with one group the kernel call validates itself.
This prints the step time of 100 small 2:4 parameters (64x64, overhead-dominated) in one group,
split into two, and split into two without the validation pass (measurement only), rounds
interleaved.
"""

import argparse
import statistics
import time

import torch

import cast_rs


class _NoValidation(cast_rs.AdamS):
    """For measurement only: AdamS without the all-groups validation pass."""

    def _run_kernel(self, gi, group, indices, args, kwargs):
        if kwargs.get("validate_only"):
            return 0, 0, [None] * len(indices)
        return super()._run_kernel(gi, group, indices, args, kwargs)


def step_ms(groups, steps: int, cls=cast_rs.AdamS) -> float:
    opt = cls(groups, lr=1e-3, pattern="2:4", total_steps=10 * steps)
    for _ in range(10):
        opt.step()
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=int, default=100)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(args.params)]
    for p in ps:
        p.grad = torch.randn_like(p)
    half = args.params // 2
    split = [{"params": ps[:half]}, {"params": ps[half:]}]
    one, two, bare = [], [], []
    for _ in range(args.rounds):
        one.append(step_ms([{"params": ps}], args.steps))
        two.append(step_ms(split, args.steps))
        bare.append(step_ms(split, args.steps, _NoValidation))
    m1, m2, m0 = statistics.median(one), statistics.median(two), statistics.median(bare)
    print(f"{args.params} parameters of 64x64, 2:4; {torch.get_num_threads()} torch threads; median of {args.rounds} rounds")
    print(f"{'param groups':<40}{'ms / step':>10}")
    print(f"{'1':<40}{m1:>10.3f}")
    print(f"{'2':<40}{m2:>10.3f}")
    print(f"{'2, without the validation pass':<40}{m0:>10.3f}")
    print(
        f"-> the validation pass costs {1e3 * (m2 - m0) / args.params:.1f} us per parameter; "
        f"a second group's own kernel call {m0 - m1:.3f} ms"
    )


if __name__ == "__main__":
    main()
