"""`python -m retrieval build ...` and `python -m retrieval serve ...`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m retrieval")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an index directory from a Search-R1 corpus jsonl")
    b.add_argument("--corpus", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--kind", default="dense", choices=["dense", "bm25"])
    b.add_argument("--encoder", help="local HF encoder directory (default: the bundled MiniLM)")
    b.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq"])
    b.add_argument("--query-prefix", default="", help='E5: "query: "')
    b.add_argument("--passage-prefix", default="", help='E5: "passage: "')
    b.add_argument("--max-length", type=int, default=256)
    b.add_argument("--shard-size", type=int, default=10_000)
    b.add_argument("--batch-size", type=int, default=64)
    s = sub.add_parser("serve", help="serve an index over HTTP (Search-R1 wire format)")
    s.add_argument("--index", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--batch-window-ms", type=float, default=4.0)
    s.add_argument("--max-batch-queries", type=int, default=256)
    s.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto")
    from retrieval.server import Limits  # light: the web stack is imported only when serving

    for f in fields(Limits):  # one flag per limit, named after the field: --max-queries, --header-timeout-s, ...
        s.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            from retrieval.build import build_index

            meta = build_index(args.corpus, args.out, args.kind, args.encoder, args.index, args.query_prefix,
                               args.passage_prefix, args.max_length, args.shard_size, args.batch_size)
            if meta.get("unchanged"):
                print(f"{args.out} is up to date: a {meta['kind']} index of this corpus (sha256 "
                      f"{meta['corpus']['sha256'][:12]}...) with these settings; nothing to do")
            else:
                print(f"built {meta['kind']} index of {meta['num_passages']} passages in {meta['build_seconds']:.1f}s: "
                      f"{args.out}")
        else:
            from retrieval.server import serve

            limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
            serve(args.index, args.host, args.port, args.batch_window_ms, args.max_batch_queries,
                  {"auto": None, "yes": True, "no": False}[args.gpu], limits)
    except (FileNotFoundError, ValueError) as e:
        print(f"retrieval {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
