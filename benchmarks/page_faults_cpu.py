"""Minor page faults and kernel time per forward call of timm's MobileViT-XS at batch 8 on CPU.

Run it under each allocator to see where glibc's time goes (docs/benchmarks.md, "The memory allocator")::

    python benchmarks/page_faults_cpu.py
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 python benchmarks/page_faults_cpu.py
"""

from __future__ import annotations

import argparse
import resource
import time

import timm
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilevit_xs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, 256, 256)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(args.calls):
            model(x)
        seconds, after = (time.perf_counter() - start) / args.calls, resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt - before.ru_minflt) / args.calls
    kernel = (after.ru_stime - before.ru_stime) / args.calls
    print(
        f"timm {args.model} batch {args.batch_size}: {seconds * 1e3:.0f} ms per call, "
        f"{faults:.0f} minor page faults per call, {kernel * 1e3:.0f} ms of kernel CPU time per call"
    )


if __name__ == "__main__":
    main()
