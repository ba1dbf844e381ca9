"""Distillation-loss cost at LLM scale: our chunked generalized JSD against a faithful plain-torch dense
generalized JSD (the TRL/GKD formulation), a plain torch loop that only reads both logit tensors once, and the
machine's floor for the work.

Forward + backward, fp32, vocab 151,936 (Qwen2.5) and 4,096 selected rows by default, on the CPU unless
`--device cuda`. Each method runs in its own subprocess so that its peak memory is measured cleanly:
"extra" memory is the peak above what the process held once both logit tensors existed (the resident set's
high-water mark on CPU, the CUDA caching allocator's peak on a GPU). A method that the machine cannot hold
(killed for memory) is re-measured at half the rows and scaled linearly, and the table says so.

The floor. Any implementation must read both tensors once and write one gradient (two reads, one write of
rows x vocab fp32): at the device's copy bandwidth, measured in the same process (a tensor copied onto another:
bytes read plus bytes written per second), that is the bandwidth floor. It must also evaluate, per element,
the two softmax exponentials and the log of the mixture (beta strictly between 0 and 1): at the device's
measured `exp` and `log` throughput on cache-sized blocks (same threads, same process), that is the compute
floor (CPU only: a GPU's special-function units evaluate exp/log an order of magnitude faster than its memory
delivers the operands, and a cache-sized block there measures launch overhead, not throughput; on CUDA the
floor is the bandwidth floor). The floor is the larger of the two (on a CPU the JSD is compute-bound), and
the target holds ours to it: at most 2x on the CPU (the rest of the per-element arithmetic and the row sums
are not in the floor), at most 1.5x on CUDA (the goal of issue 18). `floor` in the table is not the floor:
it is the plain torch loop that reads both tensors once (`(x * w).sum() + t.sum()` and its backward), kept
as a peer.

On CUDA every method runs once untimed first (torch.compile, Triton autotuning and the allocator warm up
there; the compile time reported is that first call's), and the timings are CUDA-synchronised.

On CUDA, where `liger_kernel` is installed (the GPU kit carries its wheel), Liger-Kernel's fused Triton JSD
(the two log-softmaxes it needs included) is the GPU anchor: ours within 1.5x its time.

    python bench/losses.py [--rows 4096] [--vocab 151936] [--repeats 2] [--device cpu|cuda]
                           [--methods floor,chunked_compiled,chunked,dense,liger] [--chunk-rows N]
                           [--compiled-chunk-rows N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# bench/retrieval.py must not shadow the `retrieval` package: drop this folder from the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

METHODS = ("floor", "chunked_compiled", "chunked", "dense", "liger")
NAMES = {"floor": "plain loop reading both tensors", "chunked_compiled": "ours: chunked, compiled, in place",
         "chunked": "ours: chunked, eager", "dense": "dense TRL/GKD formulation",
         "liger": "Liger-Kernel fused JSD (Triton)"}
# Rows per chunk when not given: small on the CPU (cache-sized chunks), the GPU recipes' 1024 on CUDA.
DEFAULT_CHUNK_ROWS = {"cpu": (8, 32), "cuda": (1024, 1024)}  # (eager, compiled)


def reset_peak() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def copy_bandwidth(x, sync) -> float:
    """Bytes read plus bytes written per second of copying `x` onto a tensor of its shape (best of 3)."""
    import torch

    y = torch.empty_like(x)
    y.zero_()  # touch the pages first: the first write to fresh memory pays for its page faults
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        y.copy_(x)
        sync()
        best = min(best, time.perf_counter() - t0)
    del y
    return 2 * x.numel() * x.element_size() / best


def transcendental_seconds(elements: int, vocab: int, device: str, sync) -> dict:
    """Seconds for `elements` exp and `elements` log evaluations at this CPU's throughput, measured on
    cache-sized blocks (32 rows of the vocabulary), best of the trials in at least 0.5 s."""
    import torch

    rows = 32
    a = torch.randn(rows, vocab, device=device)
    b = torch.empty_like(a)
    out = {}
    for name, fn in (("exp", torch.exp), ("log", torch.log)):
        src = a if name == "exp" else b.abs_().add_(1e-3)
        fn(src, out=b if name == "exp" else a)  # warm up
        reps = max(1, (4 * 2**20) // a.numel())
        best, spent, trials = float("inf"), 0.0, 0
        while trials < 5 or spent < 0.5:  # best of >= 5 trials and >= 0.5 s (the first trials warm the threads)
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(src, out=b if name == "exp" else a)
            sync()
            dt = time.perf_counter() - t0
            best, spent, trials = min(best, dt / (reps * a.numel())), spent + dt, trials + 1
        out[name] = best * elements
    return out


def worker(method: str, rows: int, vocab: int, repeats: int, threads: int, device: str = "cpu",
           chunk_rows: int | None = None) -> dict:
    import torch

    from nemo_sdsearch.losses.divergences import generalized_jsd, generalized_jsd_dense

    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if chunk_rows is None:
        eager, compiled = DEFAULT_CHUNK_ROWS[device]
        chunk_rows = compiled if method == "chunked_compiled" else eager
    g = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(rows, vocab, generator=g, device=device).mul_(4)
    teacher = torch.randn(rows, vocab, generator=g, device=device).mul_(4)
    weights = torch.rand(rows, generator=g, device=device)
    bandwidth = copy_bandwidth(student, sync) if method == "floor" else float("nan")
    trans = transcendental_seconds(rows * vocab, vocab, device, sync) if method == "floor" and not cuda else {}
    times = []
    x = student.requires_grad_()
    compile_s = 0.0
    if method == "liger":
        if not cuda:
            raise SystemExit("liger: Liger-Kernel's JSD is a Triton kernel; run it with --device cuda")
        from liger_kernel.transformers.jsd import LigerJSD

        liger = LigerJSD(beta=0.5)

    def run_once():
        x.grad = None
        if method == "floor":
            loss = (x * weights[:, None]).sum() + teacher.sum()  # reads both tensors once; grad is one write
        elif method == "dense":
            loss = (generalized_jsd_dense(x, teacher, 0.5) * weights).sum()
        elif method == "chunked":
            loss = (generalized_jsd(x, teacher, 0.5, chunk_rows=chunk_rows) * weights).sum()
        elif method == "liger":  # Liger's kernel takes log-probabilities: the two log-softmaxes are in its time
            loss = liger(torch.log_softmax(x, -1), torch.log_softmax(teacher, -1)) * rows  # its row mean, x rows
        elif method == "chunked_compiled":
            # As in training, where the loss gets a private gathered copy of the rows: the gradient
            # overwrites the logits (the repeats then see different logits; the time is unaffected).
            loss = (generalized_jsd(x, teacher, 0.5, chunk_rows=chunk_rows, inplace_grad=True, compile=True)
                    * weights).sum()
        else:
            raise SystemExit(f"unknown method {method}")
        loss.backward()
        del loss

    if cuda:  # compile, autotune and warm the allocator outside the timed region (reported separately)
        sync()
        t0 = time.perf_counter()
        run_once()
        sync()
        compile_s = time.perf_counter() - t0 if method == "chunked_compiled" else 0.0
    elif method == "chunked_compiled":  # compile outside the timed region (reported separately)
        t0 = time.perf_counter()
        w = torch.zeros(rows, vocab).requires_grad_()
        generalized_jsd(w[:130], teacher[:130], 0.5, chunk_rows=chunk_rows, compile=True).sum().backward()
        compile_s = time.perf_counter() - t0
        del w
    x.grad = None
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak()
        before = peak_mb()
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run_once()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mb()
    input_mb = student.numel() * 4 / 2**20
    # Extra = peak above both logit tensors and the student gradient (which every method must produce).
    extra = max(0.0, peak - before - input_mb)
    return {"method": method, "rows": rows, "seconds": min(times), "extra_mb": extra, "input_mb": input_mb,
            "compile_s": compile_s, "chunk_rows": chunk_rows, "copy_bytes_per_s": bandwidth,
            "exp_s": trans.get("exp", float("nan")), "log_s": trans.get("log", float("nan"))}


def run_method(method, rows, vocab, repeats, threads, device="cpu", chunk_rows=None):
    cmd = [sys.executable, __file__, "--worker", method, "--rows", str(rows), "--vocab", str(vocab),
           "--repeats", str(repeats), "--threads", str(threads), "--device", device]
    if chunk_rows is not None:
        cmd += ["--chunk-rows", str(chunk_rows)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        return None, p.returncode
    return json.loads(p.stdout.strip().splitlines()[-1]), 0


def main():
    from nemo_sdsearch.core.targets import target_line

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ",".join(METHODS) + " (the targets need floor and "
                         "chunked_compiled; the dense ratios need dense)")
    ap.add_argument("--chunk-rows", type=int, help="rows per chunk of eager `chunked` (default: 8 on cpu, 1024 "
                                                   "on cuda)")
    ap.add_argument("--compiled-chunk-rows", type=int, help="rows per chunk of `chunked_compiled` (default: 32 "
                                                            "on cpu, 1024 on cuda)")
    ap.add_argument("--ours", choices=("chunked_compiled", "chunked"), default="chunked_compiled",
                    help="the method the targets hold to their goals (chunked: where compiling is not wanted, "
                         "e.g. a quick CPU run)")
    ap.add_argument("--json", help="also write the results and target lines to this JSON file")
    ap.add_argument("--worker")
    ap.add_argument("--smoke", action="store_true", help="64 rows x 4,096 vocabulary, one repeat: the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.vocab, args.repeats, args.threads = 64, 4096, 1, 1
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.vocab, args.repeats, args.threads, args.device,
                                args.chunk_rows)))
        return
    methods = [m for m in args.methods.split(",") if m]
    if "liger" in methods and args.device == "cuda":
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            print("liger: liger_kernel is not installed here; the Liger anchor is not measured")
            methods.remove("liger")
    elif "liger" in methods:
        methods.remove("liger")  # a CUDA-only anchor
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}: choose from {','.join(METHODS)}")
    results = {}
    for method in [m for m in METHODS if m in methods]:
        rows = args.rows
        chunk = args.compiled_chunk_rows if method == "chunked_compiled" else args.chunk_rows
        res, rc = run_method(method, rows, args.vocab, args.repeats, args.threads, args.device, chunk)
        while res is None and rows > 256:
            print(f"{method}: subprocess exited with {rc} at {rows} rows (out of memory?); retrying at {rows // 2}")
            rows //= 2
            res, rc = run_method(method, rows, args.vocab, args.repeats, args.threads, args.device, chunk)
        if res is None:
            raise SystemExit(f"{method} failed")
        scale = args.rows / res["rows"]
        res["scaled_from_rows"] = res["rows"] if scale != 1 else None
        res["seconds"] *= scale
        res["extra_mb"] *= scale
        results[method] = res
    any_res = next(iter(results.values()))
    where = f"{args.threads} threads" if args.device == "cpu" else "CUDA"
    print(f"generalized JSD (beta 0.5) forward+backward, {args.rows} rows x {args.vocab} vocab, fp32, "
          f"{where}; one logits tensor = {any_res['input_mb']:.0f} MiB")
    print(f"{'method':34s} {'seconds':>9s} {'extra MiB':>10s} {'chunk':>6s}  note")
    for k, r in results.items():
        note = f"measured at {r['scaled_from_rows']} rows, scaled linearly" if r["scaled_from_rows"] else ""
        chunk = str(r["chunk_rows"]) if k.startswith("chunked") else ""
        print(f"{NAMES[k]:34s} {r['seconds']:9.4f} {r['extra_mb']:10.0f} {chunk:>6s}  {note}")
    targets = []
    floor_bw_s = floor_s = None
    if "floor" in results:
        peer = results["floor"]
        bw = peer["copy_bytes_per_s"]
        scale = args.rows / peer["rows"]
        floor_bw_s = 3 * peer["input_mb"] * scale * 2**20 / bw  # two reads and one write of rows x vocab fp32
        # Two softmax exps and one mixture log per element (CPU; on CUDA the bandwidth floor, see the docstring).
        floor_compute_s = 0.0 if args.device == "cuda" else (2 * peer["exp_s"] + peer["log_s"]) * scale
        floor_s = max(floor_bw_s, floor_compute_s)
        print(f"bandwidth floor {floor_bw_s:.4f} s (copy bandwidth {bw / 1e9:.1f} GB/s read + write; 2 reads + "
              f"1 write of {peer['input_mb'] * scale:.0f} MiB)")
        if args.device == "cpu":
            print(f"compute floor {floor_compute_s:.4f} s (2 exp + 1 log per element: exp {peer['exp_s'] * scale:.4f}"
                  f" s, log {peer['log_s'] * scale:.4f} s per {args.rows * args.vocab:,} elements)")
        print(f"floor = the larger: {floor_s:.4f} s ({'compute' if floor_compute_s >= floor_bw_s else 'bandwidth'}"
              f"-bound)")
    ours = results.get(args.ours)
    if ours is not None and args.ours == "chunked_compiled":
        print(f"(compiling ours took {ours['compile_s']:.0f}s once, outside the timed region)")
    elif ours is not None:
        print(f"(ours = {NAMES[args.ours]}: --ours {args.ours})")
    if ours is not None and "dense" in results:
        dense = results["dense"]
        mem_ratio = ours["extra_mb"] / max(dense["extra_mb"], 1e-9)
        time_ratio = ours["seconds"] / dense["seconds"]
        print(f"ours/dense extra memory {mem_ratio:.3f}, ours/dense time {time_ratio:.2f}")
        targets.append(target_line("jsd_extra_memory_vs_dense", mem_ratio, "<=", 0.10))
        targets.append(target_line("jsd_time_vs_dense", time_ratio, "<=", 1.0))
    if ours is not None and "floor" in results:
        peer_ratio = ours["seconds"] / results["floor"]["seconds"]
        floor_ratio = ours["seconds"] / floor_s
        print(f"ours/plain read-both loop {peer_ratio:.2f}, ours/floor {floor_ratio:.2f}")
        targets.append(target_line("jsd_time_vs_floor", floor_ratio, "<=", 1.5 if args.device == "cuda" else 2.0))
    if ours is not None and "liger" in results:
        liger_ratio = ours["seconds"] / results["liger"]["seconds"]
        print(f"ours/Liger-Kernel fused JSD time {liger_ratio:.2f}")
        targets.append(target_line("jsd_time_vs_liger", liger_ratio, "<=", 1.5))
    for line in targets:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "vocab": args.vocab, "device": args.device, "results": results,
                       "bandwidth_floor_s": floor_bw_s, "floor_s": floor_s, "targets": targets}, f, indent=1)


if __name__ == "__main__":
    main()
