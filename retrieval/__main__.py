"""`python -m nemo_sdsearch.retrieval build | serve | query ...` (in a checkout's root also
`python -m retrieval ...`).

    build   an index directory from a Search-R1 corpus jsonl
    serve   an index over HTTP in the Search-R1 wire format: an index directory made by `build` (--index DIR),
            or an existing FAISS index file with the corpus it was built from, as they are (--faiss-index FILE
            --corpus FILE --encoder DIR: Search-R1's e5_Flat.index + wiki-18.jsonl + e5-base-v2)
    query   ask a running service (ours or Search-R1's retrieval_server.py) and print what it returns
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

PROG = f"python -m {__package__}"


def _parser() -> argparse.ArgumentParser:
    from .server import Limits  # light: the web stack is imported only when serving

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an index directory from a Search-R1 corpus jsonl")
    b.add_argument("--corpus", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--kind", default="dense", choices=["dense", "bm25"])
    b.add_argument("--encoder", help="local HF encoder directory (default: the bundled MiniLM)")
    b.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq"])
    b.add_argument("--query-prefix", default="auto",
                   help='prepended to every query at serving time, recorded in meta.json; "auto" (default) picks '
                        'as Search-R1 does from the encoder\'s name: "query: " for E5, the BGE instruction for BGE, '
                        '"" otherwise')
    b.add_argument("--passage-prefix", default="auto",
                   help='prepended to every passage; "auto" (default): "passage: " for E5, "" otherwise')
    b.add_argument("--pooling", default="auto", choices=["auto", "mean", "cls", "pooler"],
                   help="how token states become one vector; auto (default): cls for BGE, mean otherwise (E5)")
    b.add_argument("--max-length", type=int, default=256)
    b.add_argument("--shard-size", type=int, default=10_000)
    b.add_argument("--batch-size", type=int, default=64)

    s = sub.add_parser("serve", help="serve an index over HTTP (Search-R1 wire format)",
                       description="Serve --index DIR (made by `build`), or --faiss-index FILE --corpus FILE "
                                   "--encoder DIR (an existing FAISS index and its corpus, as they are).")
    s.add_argument("--index", metavar="DIR", help="an index directory written by `build`")
    e = s.add_argument_group("an existing FAISS index (e.g. Search-R1's e5_Flat.index), served without rebuilding")
    e.add_argument("--faiss-index", metavar="FILE", help="the FAISS index file; vector i is line i of --corpus")
    e.add_argument("--corpus", metavar="FILE", help='the corpus jsonl it was built from ({"id", "contents"} lines; '
                                                   "a line without id gets its row number)")
    e.add_argument("--encoder", metavar="DIR", help="local HF directory of the encoder that made the index "
                                                    "(Search-R1: intfloat/e5-base-v2)")
    e.add_argument("--query-prefix",
                   help='prepended to every query; "auto" (default) picks as Search-R1 does from the encoder\'s '
                        'name: "query: " for E5, the BGE instruction for BGE, "" otherwise')
    e.add_argument("--pooling", choices=["auto", "mean", "cls", "pooler"],
                   help="how token states become one vector; auto (default): cls for BGE, mean otherwise (E5)")
    e.add_argument("--max-length", type=int, help="query tokens kept (default 256, as Search-R1)")
    s.add_argument("--topk", type=int, default=3,
                   help="documents per query when a request gives no topk or topk null (default 3, as Search-R1)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000,
                   help="TCP port (default 8000); 0: a free port chosen by the kernel, reported on stdout "
                        "(\"retrieval serve: listening on http://HOST:PORT\") and in --port-file")
    s.add_argument("--port-file", metavar="FILE",
                   help="once the server accepts connections, write the port it listens on to FILE (atomically; "
                        "removed when the server stops): how a launcher learns the port of --port 0")
    s.add_argument("--batch-window-ms", type=float, default=4.0,
                   help="how long the first of a batch of concurrent requests waits for others (default 4)")
    s.add_argument("--max-batch-queries", type=int, default=256,
                   help="queries in one batched search; more waiting queries go into the next batch, a larger "
                        "request is split over several (default 256)")
    s.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto")
    for f in fields(Limits):  # one flag per limit, named after the field: --max-queries, --header-timeout-s, ...
        s.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")

    q = sub.add_parser("query", help="ask a running retrieval service and print the documents (a health check "
                                     "that works with Search-R1's server too)")
    q.add_argument("--url", required=True, help="the service, with or without /retrieve")
    q.add_argument("--topk", type=int, default=3)
    q.add_argument("--wait-s", type=float, default=0.0, help="keep retrying this long while it is not up (default 0)")
    q.add_argument("queries", nargs="+")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "serve":
            return _serve(p, args)
        return _query(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"retrieval {args.command}: error: {e}", file=sys.stderr)
        return 2


def _build(args) -> int:
    from .build import build_index

    if args.kind == "dense":
        from .encoder import convention_mismatch, encoder_settings

        settings = encoder_settings(args.encoder, args.query_prefix, args.passage_prefix, args.pooling)
        print(f"encoder {args.encoder or 'bundled MiniLM'}: query prefix {settings[0]!r}, passage prefix "
              f"{settings[1]!r}, {settings[2]} pooling (recorded in meta.json; serve uses them)")
        mismatch = convention_mismatch(args.encoder, *settings)
        if mismatch:
            print(f"retrieval build: warning: {mismatch}; an index built so retrieves worse than with the "
                  "encoder's own convention (leave --query-prefix/--passage-prefix/--pooling at auto for it)",
                  file=sys.stderr)
    meta = build_index(args.corpus, args.out, args.kind, args.encoder, args.index, args.query_prefix,
                       args.passage_prefix, args.max_length, args.shard_size, args.batch_size, pooling=args.pooling)
    if meta.get("unchanged"):
        print(f"{args.out} is up to date: a {meta['kind']} index of this corpus (sha256 "
              f"{meta['corpus']['sha256'][:12]}...) with these settings; nothing to do")
    else:
        print(f"built {meta['kind']} index of {meta['num_passages']} passages in {meta['build_seconds']:.1f}s: "
              f"{args.out}")
    return 0


def _serve(p: argparse.ArgumentParser, args) -> int:
    import logging

    from .server import Limits, serve

    existing = {"--faiss-index": args.faiss_index, "--corpus": args.corpus, "--encoder": args.encoder}
    if args.index and any(existing.values()):
        raise ValueError("give --index DIR (an index built by `build`) or --faiss-index/--corpus/--encoder (an "
                         "existing FAISS index), not both")
    if args.index:
        _check_index_encoding(args)
    if not args.index:
        missing = [flag for flag, value in existing.items() if not value]
        if len(missing) == 3:
            raise ValueError(f"serve needs --index DIR (an index built by `{PROG} build`), or --faiss-index FILE "
                             "--corpus FILE --encoder DIR (an existing FAISS index, e.g. Search-R1's e5_Flat.index "
                             "with wiki-18.jsonl and e5-base-v2)")
        if missing:
            raise ValueError(f"serving an existing FAISS index needs {' and '.join(missing)} too")
    if args.topk < 1:
        raise ValueError(f"--topk must be at least 1, not {args.topk}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0 (any free port) to 65535, not {args.port}")
    if args.max_batch_queries < 1:
        raise ValueError(f"--max-batch-queries must be at least 1, not {args.max_batch_queries}")
    if not args.batch_window_ms >= 0:
        raise ValueError(f"--batch-window-ms must be at least 0, not {args.batch_window_ms}")
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    if args.topk > limits.max_topk:
        raise ValueError(f"--topk {args.topk} is above --max-topk {limits.max_topk}")
    use_gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger(f"{__package__}.server")
    if args.index:
        from .index import IndexRetriever

        retriever = IndexRetriever(args.index, use_gpu=use_gpu)
        source = args.index
        if retriever.kind == "dense":
            from .encoder import convention_mismatch
            from .index import rebuild_command

            enc = retriever.encoder
            log.info("index %s: encoder %s, query prefix %r, %s pooling, max length %d (as built, from meta.json)",
                     args.index, enc.path, enc.query_prefix, enc.pooling, enc.max_length)
            mismatch = convention_mismatch(enc.path, enc.query_prefix, enc.passage_prefix, enc.pooling)
            if mismatch:
                meta = {k: v for k, v in retriever.meta.items() if k not in ("query_prefix", "passage_prefix",
                                                                            "pooling")}
                log.warning("index %s was built with %s: it is served as built (queries encoded as its passages "
                            "were), but it retrieves worse than an index built with the encoder's convention: "
                            "`%s`", args.index, mismatch, rebuild_command(args.index, meta))
    else:
        from .encoder import auto_encoder_settings
        from .index import FaissFileRetriever

        prefix, pooling = auto_encoder_settings(args.encoder, args.query_prefix or "auto", args.pooling or "auto")
        args.max_length = 256 if args.max_length is None else args.max_length
        log.info("encoder %s: query prefix %r, %s pooling, max length %d, L2-normalised", args.encoder, prefix,
                 pooling, args.max_length)
        retriever = FaissFileRetriever(args.faiss_index, args.corpus, args.encoder, prefix, pooling, args.max_length,
                                       use_gpu=use_gpu, progress=True)
        source = f"{args.faiss_index} + {args.corpus}"
    log.info("loaded %s index of %d passages from %s in %.2fs", retriever.kind, len(retriever), source,
             retriever.startup_s)
    serve(retriever, args.host, args.port, args.batch_window_ms, args.max_batch_queries, limits, args.topk,
          port_file=args.port_file)
    return 0


def _check_index_encoding(args) -> None:
    """An index directory made by `build` records how its passages were encoded (meta.json) and is served with
    exactly that: --query-prefix/--pooling/--max-length may only repeat it; anything else is refused, since
    queries encoded unlike the passages retrieve worse without any error."""
    given = {"--query-prefix": ("query_prefix", args.query_prefix), "--pooling": ("pooling", args.pooling),
             "--max-length": ("max_length", args.max_length)}
    given = {flag: kv for flag, kv in given.items() if kv[1] is not None}
    if not given:
        return
    from .index import read_meta, rebuild_command

    meta = read_meta(args.index)
    if meta.get("kind") != "dense":
        raise ValueError(f"{', '.join(given)}: --index {args.index} is a {meta.get('kind')} index; these flags set "
                         "how a dense index's queries are encoded (an existing FAISS index: --faiss-index)")
    meta = {"pooling": "mean", **meta}  # built before pooling was recorded: mean
    wrong = [f"{flag} {value!r} (built with {meta.get(key)!r})" for flag, (key, value) in given.items()
             if value != "auto" and value != meta.get(key)]
    if wrong:
        raise ValueError(f"--index {args.index} was built with other encoding settings than {', '.join(wrong)}: its "
                         "queries must be encoded as its passages were, and an index directory made by `build` "
                         "records its own (meta.json), which serve uses: drop these flags, or build the index "
                         f"again with other settings (`{rebuild_command(args.index, meta)}`, changed)")


def _query(args) -> int:
    from .client import RetrievalClient, RetrievalError

    client = RetrievalClient(args.url, timeout_s=30, max_wait_s=args.wait_s, backoff_s=0.5)
    try:
        rows = client.search(args.queries, args.topk)
    except RetrievalError as e:
        print(f"retrieval query: error: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for query, docs in zip(args.queries, rows):
        print(f"query: {query}")
        for rank, d in enumerate(docs, start=1):
            print(f"  {rank}. [{d.id}] {d.score:.4f} {d.title}: {d.contents.partition(chr(10))[2][:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
