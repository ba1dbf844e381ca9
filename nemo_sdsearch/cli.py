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


def run_config_presets() -> list[str]:
    """The names `sdsearch eval --preset` takes (eval/run_config.py PRESETS)."""
    from nemo_sdsearch.eval.run_config import PRESETS

    return list(PRESETS)


def cmd_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from nemo_sdsearch.core.prompts import prompt_format
    from nemo_sdsearch.core.qa import load_benchmarks
    from nemo_sdsearch.eval import run_config
    from nemo_sdsearch.eval.harness import evaluate
    from nemo_sdsearch.models.hf import load_model_and_tokenizer
    from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine
    from nemo_sdsearch.rollout.torch_generator import TorchGenerator
    from nemo_sdsearch.world.assets import default_datasets, default_model_dir
    from nemo_sdsearch.retrieval import build_retriever, load_corpus

    console = Console()
    _threads(args.threads)
    # every rollout setting: explicit flag > --preset > the trained run's config.json (--run) > the schema default
    run = run_config.load_run(args.run) if args.run else None
    flags = {s.name: getattr(args, s.name) for s in run_config.SPECS}
    flags["no_retrieval"], flags["max_obs_tokens"] = args.no_retrieval, args.max_obs_tokens
    settings = run_config.resolve(flags, run, preset=args.preset)
    retriever_kind, url = settings["retriever"].value, settings["retrieval_url"].value
    if args.model:
        model_dir, model_source = Path(args.model), "--model"
    elif run is not None:
        if run.model is None:
            raise run_config.RunDirError(
                f"--run {run.directory}: no trained model (final/ is written when `sdsearch train` finishes); "
                f"give --model MODEL_DIR (a Hugging Face model directory)")
        model_dir, model_source = run.model, run.model_source
    else:
        model_dir, model_source = default_model_dir(), "default (the embedded model)"
    data_files, data_source = (args.data, "--data") if args.data else \
        (run.test_files, "run data.test_files") if run is not None and run.test_files else (None, None)
    if data_files:
        if not args.corpus and retriever_kind in ("bm25", "dense"):
            raise SystemExit(f"questions from files ({data_source}) with the {retriever_kind} retriever need "
                             "--corpus CORPUS.jsonl (Search-R1 format); or give --retrieval-url URL or "
                             "--no-retrieval")
        datasets = load_benchmarks(data_files)  # a Search-R1 file: one set per benchmark (data_source)
        corpus = load_corpus(args.corpus) if args.corpus and retriever_kind in ("bm25", "dense") else []
    else:
        questions, corpus = default_datasets(args.split)
        datasets = {f"tiny-world-{args.split}": questions}
        data_source = f"--split {args.split} (the bundled world)"
    if args.limit:
        datasets = {k: v[:args.limit] for k, v in datasets.items()}
    value = {k: s.value for k, s in settings.items()}
    cfg = RolloutConfig(max_turns=value["max_turns"], max_new_tokens=value["max_new_tokens"],
                        max_context=value["max_context"], topk=value["topk"], temperature=0.0,
                        retrieval=not args.no_retrieval, normalization=value["normalization"],
                        max_obs_tokens=value["max_obs_tokens"])
    record = {"model": run_config.Setting(str(model_dir), model_source),
              "data": run_config.Setting(", ".join(datasets), data_source), **settings,
              "temperature": run_config.Setting(0.0, "greedy (as the run's own dev/test evaluation)")}
    table = Table(title="sdsearch eval settings (flag > " + (f"--preset {args.preset} > " if args.preset else "")
                  + (f"run {run.directory}/config.json" if run else "run") + " > default)")
    for col in ("setting", "value", "from"):
        table.add_column(col)
    for name, s in record.items():
        table.add_row(name, str(s.value), s.source)
    console.print(table)
    model, tokenizer = load_model_and_tokenizer(model_dir, device=args.device)
    if args.no_retrieval:
        retriever = None
    elif retriever_kind == "http":
        retriever = build_retriever("http", [], url=url)
    else:
        retriever = build_retriever(retriever_kind, corpus, args.encoder)
    fmt = prompt_format(tokenizer, value["instruction"], value["chat_template"])
    engine = RolloutEngine(TorchGenerator(model, tokenizer, max_concurrent_rows=value["max_concurrent_rows"]),
                           retriever, cfg, prompt_fn=fmt.student)
    t0 = time.time()
    report = evaluate(engine, datasets, batch_size=args.batch_size, progress=not args.quiet)
    report.settings = run_config.as_record(record)
    out = Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    report.save(out)
    console.print(report.to_markdown())
    console.print(run_config.budgets_line(settings), soft_wrap=True)  # one line, also in a SLURM log
    console.print(f"{time.time() - t0:.1f}s; wrote {out}/results.json and {out}/results.md")
    return 0


def cmd_warmstart(args) -> int:
    from nemo_sdsearch.world.warmstart import WarmstartConfig, run_warmstart

    _threads(args.threads)
    cfg = WarmstartConfig(out=args.out, model=args.model, max_steps=args.steps, max_minutes=args.minutes,
                          seed=args.seed, batch_size=args.batch_size, lr=args.lr, init=args.init,
                          world_seed_base=args.world_seed_base, warmup_steps=args.warmup_steps,
                          bf16=args.bf16, vague_queries=args.vague_queries,
                          hindsight_targets=args.hindsight_targets, teacher_fraction=args.teacher_fraction,
                          reference_fraction=args.reference_fraction,
                          teacher_query_weight=args.teacher_query_weight)
    print("sdsearch warmstart resolved config:", json.dumps(cfg.__dict__, indent=1))
    record = run_warmstart(cfg)
    print(f"trained {record['steps']} steps; final loss {record['history'][-1]['loss'] if record['history'] else 'n/a'}; "
          f"wrote {cfg.out}")
    return 0


def cmd_world(args) -> int:
    from nemo_sdsearch.world.assets import default_bundle

    b = default_bundle()
    if args.audit:
        from nemo_sdsearch.world.audit import audit_world

        world, questions = (b.test_world, b.test) if args.split == "test" else (b.train_world, getattr(b, args.split))
        print(f"auditing the {args.split} world: {len(world.passages)} passages, {len(questions)} questions, "
              f"retrievers {', '.join(args.retrievers)}, top {args.topk}")
        report = audit_world(world, questions, args.retrievers, args.topk, args.encoder)
        print(report.to_markdown())
        print("\n".join(report.target_lines()))
        return 0
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


def cmd_layout(args) -> int:
    """`sdsearch layout --model 7b --nodes 1`: each recipe of that model size at its layout and the layouts that
    fit (memory per GPU per phase, nemo_sdsearch/layout.py); exit status 1 when no recipe fits."""
    from nemo_sdsearch.config import config_dir, load_config
    from nemo_sdsearch.layout import layout_report, memory_estimate, replace_nodes

    directory = args.config_dir or str(config_dir())
    names = args.recipe or sorted(p.stem for p in Path(directory).glob(f"qwen25_{args.model}_*.yaml"))
    if not names:
        print(f"no recipe qwen25_{args.model}_*.yaml in {directory}", file=sys.stderr)
        return 2
    fits = []
    for name in names:
        # the memory check is what this command reports on: the recipe loads without it
        cfg = load_config(name, list(args.overrides), args.config_dir, check_memory=False)
        cfg = replace_nodes(cfg, args.nodes or cfg.cluster.nodes)
        print(layout_report(name, cfg, top=args.top))
        est = memory_estimate(cfg)
        if args.table:
            print(est.table())
        print()
        fits.append(est.peak_gib <= cfg.cluster.gpu_memory_gib * cfg.cluster.memory_headroom)
    return 0 if any(fits) else 1


def cmd_ablate(args) -> int:
    from rich.console import Console

    from nemo_sdsearch.algorithms.ablation import ALGORITHMS, run_ablation
    from nemo_sdsearch.config import load_config

    overrides = list(args.overrides) + [w for w in args.seeds if "=" in w]
    try:
        seeds = [int(w) for w in args.seeds if "=" not in w]
    except ValueError:
        raise SystemExit(f"sdsearch ablate: --seeds takes integers (and key=value overrides), got {args.seeds}")
    if not seeds:
        raise SystemExit("sdsearch ablate: --seeds needs at least one integer seed")
    args.seeds, args.overrides = seeds, overrides
    cfg = load_config(args.config, args.overrides, args.config_dir)
    # the command that reproduces the results: resuming (reusing finished runs) changes none of them
    command = "sdsearch ablate " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}",
         *([f"--arms {' '.join(args.arms)}"] if tuple(args.arms) != ALGORITHMS else []),
         *(o for o in args.overrides if not o.lstrip("+").startswith("trainer.resume="))])
    run_ablation(cfg, args.seeds, Path(args.out), Path(args.results), command.strip(), Console(),
                 algorithms=tuple(args.arms))
    return 0


def cmd_convert(args) -> int:
    from nemo_sdsearch.checkpoint.convert import MissingDependency, convert

    _threads(args.threads)
    try:
        info = convert(args.src, args.to, args.out, tp=args.tp, pp=args.pp, tokenizer=args.tokenizer)
    except (NotImplementedError, KeyError, MissingDependency) as err:  # an architecture or a key layout we do
        raise ValueError(str(err).strip("'\"")) from err                # not convert; megatron-core missing
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
    t.add_argument("--config-dir", help="directory of YAML configs (default: the shipped configs)")
    t.set_defaults(fn=cmd_train)

    lo = sub.add_parser("layout", help="memory per GPU per phase of the Qwen2.5 recipes of a model size, and the "
                                       "layouts (tp, pp, engine tp, offload) that fit on N nodes")
    lo.add_argument("--model", required=True, choices=["3b", "7b", "32b", "72b"])
    lo.add_argument("--nodes", type=int, help="nodes of cluster.gpus_per_node GPUs (default: each recipe's)")
    lo.add_argument("--recipe", nargs="+", help="recipe names (default: every conf/qwen25_<model>_*.yaml)")
    lo.add_argument("--top", type=int, default=8, help="fitting layouts listed per recipe")
    lo.add_argument("--table", action="store_true", help="also print every component of the recipe's layout")
    lo.add_argument("overrides", nargs="*", help="config overrides, e.g. cluster.gpu_memory_gib=141")
    lo.add_argument("--config-dir")
    lo.set_defaults(fn=cmd_layout)

    a = sub.add_parser("ablate", help="GRPO vs SD-Search vs Search-E1 at equal rollout budget, several seeds; "
                                      "writes a results table and a plot")
    a.add_argument("overrides", nargs="*", help="config overrides applied to every run, e.g. search_e1.cycles=1")
    # `--seeds 0 1 2 search_e1.cycles=1`: argparse gives --seeds every word after it, so the key=value ones are
    # overrides (sorted out in cmd_ablate)
    a.add_argument("--seeds", nargs="+", default=["0", "1", "2"], metavar="SEED")
    a.add_argument("--arms", nargs="+", default=["grpo", "sd_search", "search_e1"], metavar="ARM",
                   choices=["grpo", "sd_search", "sd_placebo", "sd_others", "search_e1"],
                   help="the arms run (default: the three methods): grpo, sd_search, sd_placebo (SD-Search with "
                        "another question's hindsight block), sd_others (SD-Search whose block leaves the rollout's "
                        "own attempt out), search_e1")
    a.add_argument("--out", default="runs/ablation", help="run directories (finished runs are kept and reused)")
    a.add_argument("--results", default="docs/results.md", help="markdown results file (its PNG goes next to it)")
    a.add_argument("--config", default="tiny_cpu")
    a.add_argument("--config-dir")
    a.set_defaults(fn=cmd_ablate)

    e = sub.add_parser("eval", help="greedy search rollouts; EM/F1 per dataset and question kind",
                       description="Greedy search rollouts; EM/F1 per dataset and question kind. With --run DIR "
                                   "(a `sdsearch train` output directory) the rollout settings and the prompt "
                                   "format are the trained run's (DIR/config.json) and the model is DIR/final; "
                                   "every flag given explicitly overrides the run. Without --run, the defaults "
                                   "are the training config's defaults (conf/tiny_cpu.yaml). --preset search_r1 "
                                   "applies Search-R1's evaluation budgets over the run's (docs/search_r1.md); "
                                   "explicit flags still override it.")
    e.add_argument("--run", metavar="DIR",
                   help="a trained run's directory (trainer.out_dir): its rollout budgets, retriever, EM "
                        "normalisation, prompt and test files; the model DIR/final")
    e.add_argument("--data", nargs="+", help="question files: FlashRAG jsonl (one set per file) or Search-R1 "
                                             "parquet / jsonl (one set per data_source: its test.parquet gives "
                                             "the seven benchmarks; parquet needs pyarrow) (default: the run's "
                                             "data.test_files, else the bundled test world)")
    e.add_argument("--corpus", help="Search-R1 corpus jsonl for --data")
    e.add_argument("--split", default="test", choices=["train", "dev", "test"], help="bundled split")
    e.add_argument("--model", help="model directory (default: the run's final/, else the embedded tiny model)")
    e.add_argument("--retriever", dest="retriever", choices=["bm25", "dense"],
                   help="in-process retriever (default: the run's rollout.retriever, else bm25)")
    e.add_argument("--encoder", help="encoder directory for --retriever dense (default: bundled MiniLM)")
    e.add_argument("--retrieval-url", dest="retrieval_url",
                   help="a running retrieval service (python -m nemo_sdsearch.retrieval serve, or Search-R1's own); its corpus is used instead "
                        "of --corpus (default: the run's cluster.retrieval_url when its retriever is http)")
    e.add_argument("--no-retrieval", action="store_true", help="searches return nothing (ablation)")
    e.add_argument("--preset", choices=sorted(run_config_presets()),
                   help="a paper's evaluation settings over the run's and the defaults (explicit flags override "
                        "it): search_r1 = Search-R1's budgets (2 searching turns, 500 tokens per turn, 500 "
                        "tokens per information block, top 3, a 4096-token context per turn, its prompt and EM; "
                        "the table with sources: docs/search_r1.md)")
    e.add_argument("--topk", type=int, help="passages per search (default: the run's rollout.topk, else 3)")
    e.add_argument("--max-turns", type=int, help="searches allowed (default: the run's rollout.max_turns, else 4)")
    e.add_argument("--max-new-tokens", type=int,
                   help="tokens per turn (default: the run's rollout.max_new_tokens, else 96)")
    e.add_argument("--max-context", type=int,
                   help="context tokens (default: the run's rollout.max_context, else 1024)")
    e.add_argument("--max-obs-tokens", type=int,
                   help="tokens of one search's information block (Search-R1's max_obs_length; default: no cap, "
                        "information is cut only to fit --max-context)")
    e.add_argument("--max-concurrent-rows", type=int,
                   help="rollouts holding a KV slot at once (default: the run's rollout.max_concurrent_rows, "
                        "else 256; 0 = all)")
    e.add_argument("--em", dest="normalization", choices=["squad", "unicode"],
                   help="answer normalisation: squad (SQuAD / Search-R1, the papers' EM) or unicode (lenient) "
                        "(default: the run's reward.normalization, else squad)")
    e.add_argument("--instruction", choices=["default", "search_r1"],
                   help="prompt preset (search_r1: Search-R1's instruction verbatim) (default: the run's "
                        "prompt.instruction, else default)")
    e.add_argument("--chat-template", choices=["auto", "none"],
                   help="auto: wrap the prompt in the tokenizer's chat template when it has one (default: the "
                        "run's prompt.chat_template, else auto)")
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
    w.add_argument("--vague-queries", type=float, default=0.7,
                   help="rate at which student demonstrations of questions phrased with the vague-habit template "
                        "search a hop with a vague query (the name without the relation keyword); 0: always "
                        "precise. Leaves the policy room to improve its queries (default 0.7, as shipped)")
    w.add_argument("--hindsight-targets", choices=("precise", "outcome"), default="precise",
                   help="teacher-format demonstrations: precise = the shipped stages' (target always the precise "
                        "query, blocks outcome-sorted); outcome = the target copies an attempt labelled correct, "
                        "attempts in group order, the student's habit when none is correct (world/demos.py)")
    w.add_argument("--teacher-fraction", type=float, default=0.25, help="share of teacher-format demonstrations")
    w.add_argument("--teacher-query-weight", type=float, default=1.0,
                   help="loss weight of the search-query tokens of outcome teacher demonstrations (default 1)")
    w.add_argument("--reference-fraction", type=float, default=0.1,
                   help="share of Search-E1 reference-format demonstrations")
    w.set_defaults(fn=cmd_warmstart)

    x = sub.add_parser("world", help="write the bundled world (corpora and questions) as jsonl files; --audit: "
                                     "how often which query wording retrieves the evidence")
    x.add_argument("--out", default="runs/world")
    x.add_argument("--audit", action="store_true",
                   help="instead of writing files, print the top-k hit rate of each hop's evidence passage per "
                        "question kind and retriever for the ideal query (entity + relation keyword), the entity "
                        "alone, a wrong relation keyword and the question text, then one TARGET line per target")
    x.add_argument("--split", default="test", choices=["train", "dev", "test"],
                   help="questions (and their world) to audit (default test: the test world)")
    x.add_argument("--retrievers", nargs="+", default=["bm25", "dense"], choices=["bm25", "dense"])
    x.add_argument("--topk", type=int, default=3)
    x.add_argument("--encoder", help="encoder directory for the dense retriever (default: bundled MiniLM)")
    x.set_defaults(fn=cmd_world)

    c = sub.add_parser("convert", help="convert between HF directories, NeMo checkpoints (1.x .nemo, 2.0 "
                                       "directories; Qwen2 and Llama), Megatron-LM / Megatron-Bridge / NeMo-RL "
                                       "checkpoints, Megatron weight directories, sdsearch training archives and "
                                       "training checkpoints")
    c.add_argument("src", help="HF model directory, NeMo 1.x .nemo file (or its unpacked directory), NeMo 2.0 "
                               "checkpoint directory (context/ + weights/), Megatron-LM checkpoint (its root with "
                               "latest_checkpointed_iteration.txt, or an iter_N directory), Megatron-Bridge "
                               "checkpoint (root or iter_N with run_config.yaml), NeMo-RL step_N directory, "
                               "Megatron weight directory, sdsearch training archive or training checkpoint")
    c.add_argument("--to", required=True, choices=["hf", "megatron", "nemo", "sdsearch-archive"],
                   help="hf: HF directory; nemo: a NeMo 1.x .nemo in NeMo's own layout and key names (a "
                        "dist checkpoint, as NeMo's MegatronGPTModel saves it); megatron: this project's per-rank weight "
                        "directory; sdsearch-archive: a tar of that directory (this project's format, not NeMo's)")
    c.add_argument("out", help="output directory (hf, megatron) or file (nemo, sdsearch-archive)")
    c.add_argument("--tp", type=int, default=1, help="tensor parallel size of a megatron / sdsearch-archive output "
                                                      "(nemo: the size recorded in model_config.yaml)")
    c.add_argument("--pp", type=int, default=1, help="pipeline parallel size, likewise")
    c.add_argument("--tokenizer", metavar="DIR",
                   help="HF tokenizer directory for the output (its files are copied; the config's missing "
                        "bos/eos/pad ids are set from it). Needed where the source holds no tokenizer: a .nemo "
                        "naming a hub id or an absent path, a Megatron-LM / Bridge / NeMo-RL checkpoint without "
                        "tokenizer/, a training checkpoint")
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
