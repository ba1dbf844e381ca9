"""The `sdsearch` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or min(4, os.cpu_count() or 1))


def cmd_eval(args) -> int:
    from rich.console import Console

    from nemo_sdsearch.core.prompts import prompt_format
    from nemo_sdsearch.core.qa import load_flashrag
    from nemo_sdsearch.eval.harness import evaluate
    from nemo_sdsearch.models.hf import load_model_and_tokenizer
    from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine
    from nemo_sdsearch.rollout.torch_generator import TorchGenerator
    from nemo_sdsearch.world.assets import default_datasets, default_model_dir
    from retrieval import build_retriever, load_corpus

    console = Console()
    _threads(args.threads)
    if args.data:
        if not args.corpus and not args.no_retrieval and not args.retrieval_url:
            raise SystemExit("--data needs --corpus CORPUS.jsonl (Search-R1 format), --retrieval-url URL "
                             "or --no-retrieval")
        datasets = {Path(p).stem: load_flashrag(p) for p in args.data}
        corpus = load_corpus(args.corpus) if args.corpus else []
    else:
        questions, corpus = default_datasets(args.split)
        datasets = {f"tiny-world-{args.split}": questions}
    if args.limit:
        datasets = {k: v[:args.limit] for k, v in datasets.items()}
    model_dir = Path(args.model) if args.model else default_model_dir()
    cfg = RolloutConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                        max_context=args.max_context, topk=args.topk, temperature=0.0,
                        retrieval=not args.no_retrieval, normalization=args.em)
    resolved = {"model": str(model_dir), "datasets": {k: len(v) for k, v in datasets.items()},
                "retriever": None if args.no_retrieval else (args.retrieval_url or args.retriever),
                "rollout": cfg.__dict__, "prompt": {"instruction": args.instruction,
                                                     "chat_template": args.chat_template}}
    console.print("[bold]sdsearch eval[/bold] resolved config:", json.dumps(resolved, indent=1))
    model, tokenizer = load_model_and_tokenizer(model_dir, device=args.device)
    if args.no_retrieval:
        retriever = None
    elif args.retrieval_url:
        retriever = build_retriever("http", [], url=args.retrieval_url)
    else:
        retriever = build_retriever(args.retriever, corpus, args.encoder)
    fmt = prompt_format(tokenizer, args.instruction, args.chat_template)
    engine = RolloutEngine(TorchGenerator(model, tokenizer), retriever, cfg, prompt_fn=fmt.student)
    t0 = time.time()
    report = evaluate(engine, datasets, batch_size=args.batch_size, progress=not args.quiet)
    out = Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    report.save(out)
    console.print(report.to_markdown())
    console.print(f"{time.time() - t0:.1f}s; wrote {out}/results.json and {out}/results.md")
    return 0


def cmd_warmstart(args) -> int:
    from nemo_sdsearch.world.warmstart import WarmstartConfig, run_warmstart

    _threads(args.threads)
    cfg = WarmstartConfig(out=args.out, model=args.model, max_steps=args.steps, max_minutes=args.minutes,
                          seed=args.seed, batch_size=args.batch_size, lr=args.lr, init=args.init,
                          world_seed_base=args.world_seed_base, warmup_steps=args.warmup_steps,
                          bf16=args.bf16)
    print("sdsearch warmstart resolved config:", json.dumps(cfg.__dict__, indent=1))
    record = run_warmstart(cfg)
    print(f"trained {record['steps']} steps; final loss {record['history'][-1]['loss'] if record['history'] else 'n/a'}; "
          f"wrote {cfg.out}")
    return 0


def cmd_world(args) -> int:
    from nemo_sdsearch.world.generator import build_bundle

    b = build_bundle()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def dump(name, rows):
        with open(out / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    dump("train_corpus.jsonl", b.train_world.passages)
    dump("test_corpus.jsonl", b.test_world.passages)
    for split in ("train", "dev", "test"):
        dump(f"{split}.jsonl", [q.to_flashrag() for q in getattr(b, split)])
    print(f"wrote the bundled world to {out}: {len(b.train_world.passages)} + {len(b.test_world.passages)} passages, "
          f"{len(b.train)} train / {len(b.dev)} dev / {len(b.test)} test questions")
    return 0


def cmd_train(args) -> int:
    from rich.console import Console

    from nemo_sdsearch.algorithms import grpo, search_e1
    from nemo_sdsearch.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides, args.config_dir)
    console = Console(quiet=os.environ.get("RANK", "0") != "0")  # under torchrun only rank 0 prints
    console.print("[bold]sdsearch train[/bold] resolved config:\n" + to_yaml(cfg))
    (search_e1.run if cfg.algorithm == "search_e1" else grpo.train)(cfg, console)
    return 0


def cmd_ablate(args) -> int:
    from rich.console import Console

    from nemo_sdsearch.algorithms.ablation import run_ablation
    from nemo_sdsearch.config import load_config

    cfg = load_config(args.config, args.overrides, args.config_dir)
    command = "sdsearch ablate " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", *(f"{o}" for o in args.overrides)])
    run_ablation(cfg, args.seeds, Path(args.out), Path(args.results), command.strip(), Console())
    return 0


def cmd_convert(args) -> int:
    from nemo_sdsearch.checkpoint.nemo_archive import convert

    _threads(args.threads)
    info = convert(args.src, args.to, args.out, tp=args.tp, pp=args.pp)
    print(f"sdsearch convert: {info['from']} {args.src} -> {info['to']} {info['out']} "
          f"({info['tensors']} HF tensors, tp={info['tp']} pp={info['pp']}, "
          f"tokenizer {'copied' if info['tokenizer'] else 'not found'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdsearch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="GRPO / SD-Search training (Hydra-style key=value overrides)")
    t.add_argument("overrides", nargs="*", help="e.g. algorithm=grpo trainer.steps=10 sd.beta=0.3")
    t.add_argument("--config", default="tiny_cpu", help="config name in the config directory")
    t.add_argument("--config-dir", help="directory of YAML configs (default: the repository's conf/)")
    t.set_defaults(fn=cmd_train)

    a = sub.add_parser("ablate", help="GRPO vs SD-Search vs Search-E1 at equal rollout budget, several seeds; "
                                      "writes a results table and a plot")
    a.add_argument("overrides", nargs="*", help="config overrides applied to every run, e.g. cycles=1")
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a.add_argument("--out", default="runs/ablation", help="run directories (finished runs are kept and reused)")
    a.add_argument("--results", default="docs/results.md", help="markdown results file (its PNG goes next to it)")
    a.add_argument("--config", default="tiny_cpu")
    a.add_argument("--config-dir")
    a.set_defaults(fn=cmd_ablate)

    e = sub.add_parser("eval", help="greedy search rollouts; EM/F1 per dataset and question kind")
    e.add_argument("--data", nargs="+", help="FlashRAG jsonl files (default: the bundled test world)")
    e.add_argument("--corpus", help="Search-R1 corpus jsonl for --data")
    e.add_argument("--split", default="test", choices=["train", "dev", "test"], help="bundled split")
    e.add_argument("--model", help="model directory (default: the embedded tiny model)")
    e.add_argument("--retriever", default="bm25", choices=["bm25", "dense"])
    e.add_argument("--encoder", help="encoder directory for --retriever dense (default: bundled MiniLM)")
    e.add_argument("--retrieval-url", help="a running retrieval service (python -m retrieval serve); "
                                            "its corpus is used instead of --corpus")
    e.add_argument("--no-retrieval", action="store_true", help="searches return nothing (ablation)")
    e.add_argument("--topk", type=int, default=3)
    e.add_argument("--max-turns", type=int, default=4)
    e.add_argument("--max-new-tokens", type=int, default=96)
    e.add_argument("--max-context", type=int, default=1024)
    e.add_argument("--em", default="squad", choices=["squad", "unicode"],
                   help="answer normalisation: squad (SQuAD / Search-R1, the papers' EM) or unicode (lenient)")
    e.add_argument("--instruction", default="default", choices=["default", "search_r1"],
                   help="prompt preset (search_r1: Search-R1's instruction verbatim)")
    e.add_argument("--chat-template", default="auto", choices=["auto", "none"],
                   help="auto: wrap the prompt in the tokenizer's chat template when it has one")
    e.add_argument("--batch-size", type=int, default=50)
    e.add_argument("--limit", type=int, help="first N questions of each dataset")
    e.add_argument("--device")
    e.add_argument("--threads", type=int)
    e.add_argument("--out", help="output directory (default runs/eval-TIMESTAMP)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=cmd_eval)

    w = sub.add_parser("warmstart", help="train the tiny model from scratch on search demonstrations")
    w.add_argument("--out", default="runs/warmstart")
    w.add_argument("--model", default="tiny")
    w.add_argument("--steps", type=int, default=900)
    w.add_argument("--minutes", type=float, default=90.0)
    w.add_argument("--batch-size", type=int, default=16)
    w.add_argument("--lr", type=float, default=2e-3)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--init", help="continue training this model directory (keeps its tokenizer)")
    w.add_argument("--world-seed-base", type=int, default=10_000, help="seed of the first demonstration world")
    w.add_argument("--warmup-steps", type=int, default=100)
    w.add_argument("--threads", type=int)
    w.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the forward pass (fp32 weights, optimizer and loss); about 1.45x "
                        "faster on CPUs with AVX512-BF16/AMX, slower elsewhere")
    w.set_defaults(fn=cmd_warmstart)

    x = sub.add_parser("world", help="write the bundled world (corpora and questions) as jsonl files")
    x.add_argument("--out", default="runs/world")
    x.set_defaults(fn=cmd_world)

    c = sub.add_parser("convert", help="convert between HF directories, .nemo archives, Megatron weight "
                                       "directories and Megatron training checkpoints (Qwen2 family)")
    c.add_argument("src", help="HF model directory, .nemo file, Megatron weight directory or training checkpoint")
    c.add_argument("--to", required=True, choices=["hf", "megatron", "nemo"])
    c.add_argument("out", help="output directory (hf, megatron) or .nemo file")
    c.add_argument("--tp", type=int, default=1, help="tensor parallel size of a megatron/nemo output")
    c.add_argument("--pp", type=int, default=1, help="pipeline parallel size of a megatron/nemo output")
    c.add_argument("--threads", type=int)
    c.set_defaults(fn=cmd_convert)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        print(f"sdsearch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
