#!/usr/bin/env python
"""Mutation testing of what trains: change one operator at a time in the losses, the rollout-facing core and
the loss-facing parts of the algorithms, run the tests that cover the changed file, and report every mutant
the tests did not kill (a surviving mutant is a missing test, or an equivalent mutant to be named).

    python scripts/mutation.py                      # every target, every category (over an hour on 2 cores)
    python scripts/mutation.py --files losses/policy.py --categories sign
    python scripts/mutation.py --list               # the mutants only, nothing run
    python scripts/mutation.py --report docs/testing.md   # rewrite the report section of docs/testing.md

How: the working tree is copied once to a scratch directory (without .git and the venv); each mutant is one
AST edit of one target file, written into that copy, then `python -m pytest -x` runs the file's tests there
(cwd and PYTHONPATH point at the copy, so the copy's package is the one imported, also in spawned workers
and CLI subprocesses); the original file is put back before the next mutant. A mutant is killed when the
tests fail (or time out: --timeout), survives when they pass, and is void when the mutated file no longer
compiles. The mutation operators (AST nodes, so comments and strings are never touched):

    sign      unary minus removed; + <-> -; * <-> / is not used (scales rarely change a sign test)
    shift     "x + 1" / "x - 1" -> "x"; a slice bound that is a small integer moved by one; a term named
              *shift* / *offset* dropped from a sum
    label     True <-> False (flags, masks, labels of outcomes)
    clip      min <-> max (builtins, torch.minimum/maximum, amax/amin), clamp's min= <-> max=
    mask      == <-> !=, < <-> <=, > <-> >=, `not x` -> `x`, `~x` -> `x`, `and` <-> `or`
    term      one operand of a + / - of two non-constant terms dropped
    constant  an integer 0 <-> 1 (dimensions, indices, guards such as max(n, 1))

Only the functions listed in TARGETS are mutated (all functions of a file where the list is None), so the
count stays in the hundreds. Exit status: 0 when every sign/shift/label/clip mutant was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "nemo_sdsearch"

# file -> functions to mutate (None: every function), and the tests that cover it (run in this order, -x)
TARGETS: dict[str, tuple[list[str] | None, list[str]]] = {
    "losses/policy.py": (None, ["tests/test_losses.py", "tests/test_objective.py"]),
    "losses/grpo_sd_loss.py": (None, ["tests/test_objective.py"]),
    "losses/divergences.py": (None, ["tests/test_losses.py", "tests/test_objective.py"]),
    "losses/vocab_parallel.py": (None, ["tests/test_losses.py", "tests/test_objective.py",
                                        "tests/test_vocab_parallel.py"]),
    "losses/shard.py": (None, ["tests/test_vocab_shard.py", "tests/test_objective.py"]),
    "losses/opsd_loss.py": (None, ["tests/test_objective.py", "tests/test_search_e1.py"]),
    "core/hindsight.py": (None, ["tests/test_hindsight.py", "tests/test_objective.py"]),
    "core/pairs.py": (None, ["tests/test_pairs.py", "tests/test_objective.py"]),
    "core/reward.py": (None, ["tests/test_reward.py"]),
    "core/trajectory.py": (["policy_mask", "query_mask", "response_ids", "finalize", "add_policy"],
                           ["tests/test_spans.py", "tests/test_objective.py", "tests/test_engine.py"]),
    "algorithms/opsd.py": (None, ["tests/test_objective.py", "tests/test_search_e1_distributed.py"]),
    "algorithms/sd_search.py": (None, ["tests/test_hindsight.py", "tests/test_objective.py"]),
    "algorithms/grpo.py": (["micro_batch_tensors", "policy_micro_batches", "_teacher_pass", "update_policy"],
                           ["tests/test_objective.py"]),
    "algorithms/search_e1.py": (["opsd_items", "opsd_round", "pool_records"],
                                ["tests/test_objective.py", "tests/test_search_e1.py", "tests/test_faults.py"]),
    "models/hf.py": (["logits_at", "logprobs_at", "teacher_logits_at", "train_step"],
                     ["tests/test_objective.py"]),
}
# cheap tests first: -x stops at the first failure, so a mutant that a unit test kills costs seconds

# Equivalent mutants: (file, function, operator description, the mutated line's code) -> why no test can kill
# it. They are reported as such and do not count against the acceptance; a line whose code changes drops out.
EQUIVALENT: dict[tuple[str, str, str, str], str] = {
    ("losses/divergences.py", "_chunk_kernel", "True -> False",
     "_COMPILED[fn] = torch.compile(fn, fullgraph=True)"):
        "fullgraph only forbids graph breaks: the compiled kernel computes the same numbers",
    ("losses/divergences.py", "forward", "slice upper 0 -> -1",
     "losses = torch.empty(n, dtype=_f32(student_logits[:0]).dtype, device=student_logits.device)"):
        "only the dtype of the slice is read",
    ("losses/divergences.py", "forward", "slice upper 0 -> 1",
     "losses = torch.empty(n, dtype=_f32(student_logits[:0]).dtype, device=student_logits.device)"):
        "only the dtype of the slice is read",
    ("losses/grpo_sd_loss.py", "jsd_at_queries", "True -> False",
     "chunk_rows=sd_cfg.chunk_rows, inplace_grad=True, **vocab_shard)"):
        "memory only: the gradient is kept in the gathered rows or in a new buffer, the same numbers",
    ("losses/grpo_sd_loss.py", "jsd_at_queries", "True -> False",
     "sd_cfg.temperature, sd_cfg.chunk_rows, inplace_grad=True,"):
        "memory only: the gradient is kept in the gathered rows or in a new buffer, the same numbers",
    ("algorithms/sd_search.py", "group_hindsight_blocks", "index [0] -> [-1]",
     "blocks.append(hindsight_block(attempts, cfg, gold_answer=group[0].golden_answers[0],"):
        "group[0] -> group[-1]: every rollout of a group is the same question with the same gold answers "
        "(golden_answers[0] -> [-1] is killed by test_hindsight)",
    ("algorithms/grpo.py", "policy_micro_batches", "False -> True",
     "old = None if G.mini_batches == 1 else actor.logprobs_at(batch, rows, cols, T, with_grad=False)"):
        "inside torch.no_grad(): no graph is built either way",
    ("algorithms/grpo.py", "policy_micro_batches", "False -> True",
     "ref_lp = ref.logprobs_at(batch, rows, cols, T, with_grad=False) if ref is not None else None"):
        "inside torch.no_grad(): no graph is built either way",
    ("models/hf.py", "train_step", "True -> False", "self.optimizer.zero_grad(set_to_none=True)"):
        "set_to_none is a memory option: zero and absent gradients give the same AdamW step",
    ("losses/vocab_parallel.py", "_div_gradient", "index [0] -> [-1]",
     "g = q.mul_(g.sub_(parts[0][:, None]))      # q (g - loss)"):
        "reverse KL: `parts` has one row (k = 1), so parts[-1] is parts[0]",
    ("algorithms/opsd.py", "opsd_step", "slice upper 1 -> 2",
     "mbs = opsd_micro_batches(batch[:1] if idle else mine, actor, teacher, pad_id, e1.opsd_micro_batch_size, weights)"):
        "the idle replica's pairs are scored at weight 0: one pair or two, the gradient is zero",
}

CATEGORIES = ("sign", "shift", "label", "clip", "mask", "term", "constant")
MUST_KILL = ("sign", "shift", "label", "clip")  # the acceptance: every one of these killed


@dataclass
class Mutant:
    file: str
    line: int
    col: int
    category: str
    what: str
    function: str
    source: str = ""        # the mutated file's text (not stored in reports)
    status: str = ""        # killed | survived | equivalent | void | timeout
    code: str = ""          # the original line's code (for EQUIVALENT)
    why: str = ""           # why it is equivalent
    seconds: float = 0.0
    killed_by: str = ""     # the first failing test


# ---------------------------------------------------------------------------------------------------
# Generating mutants
# ---------------------------------------------------------------------------------------------------
CMP_SWAP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
            ast.GtE: ast.Gt}
MINMAX = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "amax": "amin", "amin": "amax"}


def _mentions(node: ast.AST, words: tuple[str, ...]) -> bool:
    for n in ast.walk(node):
        name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else ""
        if any(w in name.lower() for w in words):
            return True
    return False


def _is_const(node, values=None) -> bool:
    return isinstance(node, ast.Constant) and not isinstance(node.value, bool) and isinstance(node.value, (int, float)) \
        and (values is None or node.value in values)


def _edits(node: ast.AST):
    """(category, description, replacement builder) for the mutations of one node; a builder takes a deep
    copy of the node and returns its replacement."""
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub) and not _is_const(node.operand):
            yield "sign", "unary minus removed", lambda n: n.operand
        if isinstance(node.op, ast.Not):
            yield "mask", "`not` removed", lambda n: n.operand
        if isinstance(node.op, ast.Invert):
            yield "mask", "`~` removed", lambda n: n.operand
    elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        op = "+" if isinstance(node.op, ast.Add) else "-"
        if _is_const(node.right, (1,)) or _is_const(node.left, (1,)):
            keep = "left" if _is_const(node.right, (1,)) else "right"
            yield "shift", f"`{op} 1` dropped", (lambda n: n.left) if keep == "left" else (lambda n: n.right)
        elif _mentions(node.right, ("shift", "offset")):
            yield "shift", f"`{op} shift` dropped", lambda n: n.left
        swap = ast.Sub if op == "+" else ast.Add
        yield "sign", f"`{op}` -> `{'-' if op == '+' else '+'}`", lambda n, swap=swap: ast.BinOp(n.left, swap(), n.right)
        if not any(_is_const(x) for x in (node.left, node.right)) and not _mentions(node.right, ("shift", "offset")):
            yield "term", f"right operand of `{op}` dropped", lambda n: n.left
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in CMP_SWAP:
        new = CMP_SWAP[type(node.ops[0])]
        yield "mask", f"{type(node.ops[0]).__name__} -> {new.__name__}", \
            lambda n, new=new: ast.Compare(n.left, [new()], n.comparators)
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        yield "mask", f"{type(node.op).__name__.lower()} -> {new.__name__.lower()}", \
            lambda n, new=new: ast.BoolOp(new(), n.values)
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield "label", f"{node.value} -> {not node.value}", lambda n: ast.Constant(not n.value)
    elif isinstance(node, ast.Constant) and type(node.value) is int and node.value in (0, 1):
        yield "constant", f"{node.value} -> {1 - node.value}", lambda n: ast.Constant(1 - n.value)
    elif isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in MINMAX:
            def swap(n, new=MINMAX[name]):
                if isinstance(n.func, ast.Name):
                    n.func = ast.Name(new, ast.Load())
                else:
                    n.func = ast.Attribute(n.func.value, new, ast.Load())
                return n
            yield "clip", f"{name} -> {MINMAX[name]}", swap
        kws = [k.arg for k in node.keywords]
        if name in ("clamp", "clamp_", "clip") and ("min" in kws) != ("max" in kws):
            def flip(n):
                for k in n.keywords:
                    if k.arg in ("min", "max"):
                        k.arg = "max" if k.arg == "min" else "min"
                return n
            yield "clip", f"{name}({'min' if 'min' in kws else 'max'}=) -> the other bound", flip
    elif isinstance(node, ast.Slice):
        for part in ("lower", "upper"):
            bound = getattr(node, part)
            if _is_const(bound) and isinstance(bound.value, int) and abs(bound.value) <= 2:
                for d in (-1, 1):
                    v = bound.value + d
                    def move(n, part=part, v=v):  # a lower bound of 0 is written as none; x[:0] stays x[:0]
                        setattr(n, part, None if v == 0 and part == "lower" else ast.Constant(v))
                        return n
                    yield "shift", f"slice {part} {bound.value} -> {v}", move
    elif isinstance(node, ast.Subscript) and _is_const(node.slice, (0, -1, 1)):
        # x[0] <-> x[-1], x[1] -> x[0]
        v = node.slice.value
        for new in {0: (-1,), -1: (0,), 1: (0,)}[v]:
            def idx(n, new=new):
                n.slice = ast.Constant(new)
                return n
            yield "shift", f"index [{v}] -> [{new}]", idx


class _Replace(ast.NodeTransformer):
    def __init__(self, target_id: int, build):
        self.target_id, self.build, self.done = target_id, build, False

    def generic_visit(self, node):
        if not self.done and getattr(node, "_mut_id", None) == self.target_id:
            self.done = True
            return self.build(node)
        return super().generic_visit(node)


def _functions(tree: ast.Module, names):
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (names is None or node.name in names):
            out.append(node)
    return out


def _skip(node: ast.AST, parents: dict) -> bool:
    """Nodes whose mutation changes only messages, annotations or docstrings."""
    p = parents.get(id(node))
    while p is not None:
        if isinstance(p, (ast.JoinedStr, ast.arg)) or (isinstance(p, ast.Call) and isinstance(p.func, ast.Name)
                                                       and p.func.id in ("ValueError", "RuntimeError", "print")):
            return True
        if isinstance(p, (ast.Raise, ast.Assert)):
            return True
        if isinstance(p, ast.AnnAssign) and node is not p.value and not _inside(node, p.value):
            return True
        p = parents.get(id(p))
    return False


def _inside(node, root) -> bool:
    return root is not None and any(n is node for n in ast.walk(root))


def mutants_of(rel: str, functions) -> list[Mutant]:
    path = ROOT / PKG / rel
    text = path.read_text()
    tree = ast.parse(text)
    parents = {}
    for p in ast.walk(tree):
        for c in ast.iter_child_nodes(p):
            parents[id(c)] = p
    for i, n in enumerate(ast.walk(tree)):
        n._mut_id = i
    out, seen = [], set()
    for fn in _functions(tree, functions):
        body_nodes = [n for stmt in fn.body for n in ast.walk(stmt)]
        if body_nodes and isinstance(fn.body[0], ast.Expr) and isinstance(getattr(fn.body[0], "value", None), ast.Constant):
            doc = set(id(n) for n in ast.walk(fn.body[0]))
            body_nodes = [n for n in body_nodes if id(n) not in doc]
        for node in body_nodes:
            if _skip(node, parents) or isinstance(node, ast.FunctionDef):
                continue
            for category, what, build in _edits(node):
                key = (node._mut_id, what)
                if key in seen:
                    continue
                seen.add(key)
                mutated = copy.deepcopy(tree)
                r = _Replace(node._mut_id, lambda n, b=build: b(n))
                mutated = r.visit(mutated)
                if not r.done:
                    continue
                ast.fix_missing_locations(mutated)
                try:
                    src = ast.unparse(mutated)
                except Exception:  # noqa: BLE001 - an edit the unparser cannot write is no mutant
                    continue
                code = text.splitlines()[node.lineno - 1].strip()
                m = Mutant(rel, node.lineno, node.col_offset, category, what, fn.name, src, code=code)
                m.why = EQUIVALENT.get((rel, fn.name, what, code), "")
                out.append(m)
    return out


# ---------------------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------------------
def scratch_copy() -> Path:
    dst = Path(tempfile.mkdtemp(prefix="sdsearch-mutation-"))
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache")
    for item in ROOT.iterdir():
        if item.name in (".git", ".venv", "runs"):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(item, dst / item.name)
    return dst


PRELOAD = ("numpy", "torch", "transformers", "peft", "safetensors", "tokenizers", "rich", "yaml", "rapidfuzz",
           "bm25s", "pytest", "hypothesis")


def preload() -> None:
    """Import the heavy third-party packages once in this process; each mutant's test run is a fork of it (the
    project itself is never imported here, so every fork imports the mutated copy)."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM  # noqa: F401 - lazy modules
    except ImportError:
        pass


# tests left out of mutant runs: they re-check what other tests in the list already check, at a high cost
# (the compiled chunk kernels are the eager ones through torch.compile: 30 s of compilation per run)
DESELECT = ["tests/test_losses.py::test_compiled_chunks_match_eager"]


def _pytest_args(tests: list[str]) -> list[str]:
    deselect = [a for d in DESELECT if d.split("::")[0] in tests for a in ("--deselect", d)]
    return ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rf", *deselect, *tests]


def _outcome(rc: int, out: str) -> tuple[str, str]:
    if rc == 0:
        return "survived", ""
    if rc == 5:
        raise SystemExit(f"no tests collected:\n{out[-2000:]}")
    failed = next((line.split(" ", 2)[1] for line in out.splitlines() if line.startswith("FAILED ")), "")
    return "killed", failed or (out.strip().splitlines() or [f"exit {rc}"])[-1][:200]


def run_tests(copy_root: Path, tests: list[str], timeout: float, fork: bool = True) -> tuple[str, str]:
    """Run `tests` against the copy: in a fork of this (preloaded) process, or a fresh interpreter."""
    env_path = str(copy_root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    if not fork:
        env = dict(os.environ, PYTHONPATH=env_path, PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", *_pytest_args(tests)]
        try:
            p = subprocess.run(cmd, cwd=copy_root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", ""
        return _outcome(p.returncode, p.stdout + p.stderr)
    log = copy_root / ".mutation-run.log"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: a process group of its own (a timeout kills its workers too), output to the log
        rc = 3
        try:
            os.setpgid(0, 0)
            os.chdir(copy_root)
            sys.path.insert(0, str(copy_root))
            os.environ["PYTHONPATH"] = env_path
            sys.dont_write_bytecode = True
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest

            rc = int(pytest.main(_pytest_args(tests)))
        except BaseException:  # noqa: BLE001 - whatever happens, the parent gets an exit status
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return "timeout", ""
        time.sleep(0.05)
    rc = os.waitstatus_to_exitcode(status)
    return _outcome(rc, log.read_text(errors="replace") if log.exists() else "")


def baseline(copy_root: Path, files: list[str], timeout: float, fork: bool) -> None:
    tests = sorted({t for f in files for t in TARGETS[f][1]})
    status, _ = run_tests(copy_root, tests, timeout * 4, fork)
    if status != "survived":
        raise SystemExit(f"the unmutated tree fails its own tests ({tests}): fix that first")


def run(mutants: list[Mutant], copy_root: Path, timeout: float, log, fork: bool) -> None:
    t_all = time.time()
    for k, m in enumerate(mutants, 1):
        if m.why:
            m.status = "equivalent"
            log(f"[{k}/{len(mutants)}] equivalent {m.file}:{m.line} {m.function}: {m.what} ({m.why})")
            continue
        target = copy_root / PKG / m.file
        original = target.read_text()
        try:
            compile(m.source, str(target), "exec")
        except SyntaxError:
            m.status = "void"
            continue
        target.write_text(m.source)
        t0 = time.time()
        try:
            m.status, m.killed_by = run_tests(copy_root, TARGETS[m.file][1], timeout, fork)
        finally:
            target.write_text(original)
        m.seconds = time.time() - t0
        eta = (time.time() - t_all) / k * (len(mutants) - k)
        log(f"[{k}/{len(mutants)}] {m.status:8s} {m.file}:{m.line} {m.function}: {m.category}: {m.what}"
            f"  ({m.seconds:.0f} s, ~{eta / 60:.0f} min left)")


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def summary(mutants: list[Mutant]) -> dict:
    table = {}
    for c in CATEGORIES:
        ms = [m for m in mutants if m.category == c and m.status not in ("void", "")]
        if not ms:
            continue
        killed = sum(m.status in ("killed", "timeout") for m in ms)
        equivalent = sum(m.status == "equivalent" for m in ms)
        table[c] = {"mutants": len(ms), "killed": killed, "equivalent": equivalent,
                    "survived": len(ms) - killed - equivalent}
    return table


def markdown(mutants: list[Mutant], command: str, seconds: float) -> str:
    table = summary(mutants)
    total = sum(v["mutants"] - v["equivalent"] for v in table.values())
    killed = sum(v["killed"] for v in table.values())
    lines = [f"Command: `{command}` ({seconds / 60:.0f} min). Score: **{killed}/{total}** non-equivalent mutants "
             f"killed ({100 * killed / max(total, 1):.1f}%).", "",
             "| category | mutants | killed | equivalent | survived |", "|---|---:|---:|---:|---:|"]
    for c, v in table.items():
        lines.append(f"| {c} | {v['mutants']} | {v['killed']} | {v['equivalent']} | {v['survived']} |")
    by_file = {}
    for m in mutants:
        if m.status not in ("void", ""):
            d = by_file.setdefault(m.file, [0, 0, 0])
            d[0] += 1
            d[1] += m.status in ("killed", "timeout")
            d[2] += m.status == "equivalent"
    lines += ["", "| file | mutants | killed | equivalent |", "|---|---:|---:|---:|"]
    lines += [f"| `{f}` | {n} | {k} | {e} |" for f, (n, k, e) in sorted(by_file.items())]
    surv = [m for m in mutants if m.status == "survived"]
    lines += ["", f"Surviving mutants ({len(surv)}):" if surv else "No mutant survived.", ""]
    for m in surv:
        lines.append(f"- `{m.file}:{m.line}` `{m.function}`: {m.category}: {m.what}: `{m.code}`")
    eq = [m for m in mutants if m.status == "equivalent"]
    if eq:
        lines += ["", f"Equivalent mutants ({len(eq)}, `EQUIVALENT` in the script):", ""]
        lines += [f"- `{m.file}:{m.line}` `{m.function}`: {m.what}: {m.why}" for m in eq]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- mutation-report:begin -->", "<!-- mutation-report:end -->"


def write_report(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{body}{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="*", default=None, help=f"target files under {PKG}/ (default: all of TARGETS)")
    ap.add_argument("--categories", nargs="*", default=list(CATEGORIES), choices=CATEGORIES)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run (then: killed by timeout)")
    ap.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    ap.add_argument("--json", type=Path, default=None, help="write every mutant's result here")
    ap.add_argument("--report", type=Path, default=None, help="rewrite the mutation-report section of this markdown file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    ap.add_argument("--no-fork", action="store_true", help="a fresh interpreter per mutant (slower; no preloading)")
    ap.add_argument("--rerun-survivors", type=Path, default=None, metavar="JSON",
                    help="take every result of an earlier --json file and run again only the mutants that survived "
                         "there (after new tests were written); the report covers them all")
    args = ap.parse_args(argv)
    files = args.files or list(TARGETS)
    unknown = [f for f in files if f not in TARGETS]
    if unknown:
        ap.error(f"not a target: {unknown}; targets: {list(TARGETS)}")
    mutants = [m for f in files for m in mutants_of(f, TARGETS[f][0]) if m.category in args.categories]
    counts = {c: sum(m.category == c for m in mutants) for c in args.categories}
    print(f"{len(mutants)} mutants in {len(files)} files: {counts}", flush=True)
    if args.rerun_survivors:
        # (two mutants of one line differ by their column: `mkdir(parents=True, exist_ok=True)`)
        earlier = {(r["file"], r["function"], r["what"], r["code"], r["col"]): r
                   for r in json.loads(args.rerun_survivors.read_text())}
        todo = []
        for m in mutants:
            r = earlier.get((m.file, m.function, m.what, m.code, m.col))
            if m.why:
                m.status = "equivalent"
            elif r is None or r["status"] == "survived":
                todo.append(m)  # new since that run, or survived it
            else:
                m.status, m.seconds, m.killed_by = r["status"], r["seconds"], r["killed_by"]
        print(f"re-running {len(todo)} mutants (survivors of {args.rerun_survivors} and new ones)", flush=True)
    else:
        todo = mutants
    if args.list:
        for m in mutants:
            print(f"{m.file}:{m.line} {m.function}: {m.category}: {m.what}")
        return 0
    root = scratch_copy()
    t0 = time.time()
    try:
        fork = not args.no_fork and hasattr(os, "fork")
        if fork:
            preload()
        baseline(root, files, args.timeout, fork)
        run(todo, root, args.timeout, lambda s: print(s, flush=True), fork)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.time() - t0
    command = "python scripts/mutation.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    body = markdown(mutants, command, seconds)
    print(body)
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in asdict(m).items() if k != "source"} for m in mutants], indent=1))
    if args.report:
        write_report(args.report, body)
    must = [m for m in mutants if m.category in MUST_KILL and m.status == "survived"]
    return 1 if must else 0


if __name__ == "__main__":
    sys.exit(main())
