"""A new user's day, timed: own JSONL -> prepare -> train on 2 ranks -> kill -9 -> resume -> export -> generate.

    python bench/walkthrough.py                        # 5 MB of the machine's docs, 40 steps, kill at 26
    python bench/walkthrough.py --corpus-mb 0.5 --steps 8 --save-interval 4 --kill-at 6 --vocab-size 512

Every command is the one that README.md ("Train on your own data") and docs/trainer.md show, run as a user
runs it: the `ds-fp4-data` console script, the `deepspeed` launcher on launch/train.py with a config
copied from configs/demo-cpu.json, `python -m launch.export`, then transformers' `generate`.

1. corpus: text files of /usr/share/doc (gzipped ones unpacked) cut at paragraphs into documents of about
   2,000 characters, one JSON line {"text": ...} each, up to --corpus-mb; the docstrings of the running
   Python's standard library top it up where the docs are few.
2. prepare: `ds-fp4-data prepare corpus.jsonl --out data --vocab-size V --eval-fraction 0.02`.
3. train: save_interval and eval_interval from the flags; one rank is killed with SIGKILL (kill -9) once
   steps.jsonl reaches --kill-at, as a crash would; the launcher then stops the other rank.
4. resume: the same command again; it continues from the newest complete checkpoint.
5. reference: the same config uninterrupted in another out_dir (--set trainer.out_dir=...); the resumed
   run's losses must equal it bit for bit (the same CPU, the same world size), each step appearing once.
6. export the last checkpoint; 7. generate greedily from a prompt, then again with the EOS forced at the
   third new token: generation must end there.

It exits non-zero if any check fails, and writes bench/results/walkthrough_<cpu>_<date>.json with the
seconds per phase and the figures.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.cpu_numerics import cpu_model  # noqa: E402
from launch.distributed import free_port  # noqa: E402

BIN = Path(sys.executable).parent  # the venv's console scripts: ds-fp4-data, deepspeed
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # as the Makefile sets


def doc_texts():
    """Readable text of the machine's own documentation, then of the standard library's docstrings."""
    for path in sorted(Path("/usr/share/doc").rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        if len(text) > 200 and "\x00" not in text:
            yield text
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d)
        if len(text) > 200:
            yield text


def documents(chars: int = 2000):
    """The texts cut into documents of about ``chars`` characters at paragraph breaks, the size of a web
    page or an article (a changelog of /usr/share/doc alone can be a megabyte)."""
    for text in doc_texts():
        part = ""
        for para in text.split("\n\n"):
            part = f"{part}\n\n{para}" if part else para
            if len(part) >= chars:
                yield part
                part = ""
        if len(part) > 200:
            yield part


def write_corpus(path: Path, megabytes: float) -> dict:
    limit, size, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w") as f:
        for text in documents():
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            size, docs = size + len(line), docs + 1
            if size >= limit:
                break
    return {"documents": docs, "bytes": size}


def run_config(data: Path, out: Path, a: argparse.Namespace) -> dict:
    """configs/demo-cpu.json with the user's data instead of the embedded corpus (docs/trainer.md)."""
    cfg = json.loads((REPO / "configs" / "demo-cpu.json").read_text())
    cfg["data"] = {"sources": [{"path": str(data), "weight": 1.0}], "seq_len": 128, "seed": 1234}
    cfg["trainer"].update(out_dir=str(out), max_steps=a.steps, warmup_steps=min(15, a.steps // 4),
                          save_interval=a.save_interval, eval_interval=a.save_interval, log_interval=2)
    return cfg


def train_cmd(cfg: Path, *sets: str) -> list[str]:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--deepspeed_config", str(cfg)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())]


def last_step(run_dir: Path) -> int:
    try:
        return max((s for s, _ in losses(run_dir)), default=0)
    except (FileNotFoundError, ValueError, KeyError):
        return 0  # not there yet, or a line being written


def train_and_kill(cmd: list[str], run_dir: Path, kill_at: int, log: Path) -> dict:
    """Start the launcher; once steps.jsonl reaches kill_at, SIGKILL the rank with --local_rank=1."""
    with open(log, "w") as f:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    killed = None
    while launcher.poll() is None:
        if killed is None and last_step(run_dir) >= kill_at:
            ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                     if "--local_rank=1" in p.cmdline()]
            if len(ranks) != 1:
                raise RuntimeError(f"expected one process with --local_rank=1 under the launcher, found {len(ranks)}")
            ranks[0].send_signal(signal.SIGKILL)
            killed = last_step(run_dir)
        time.sleep(0.1)
    if killed is None:
        raise RuntimeError(f"the run ended (exit {launcher.returncode}) before step {kill_at}; see the log")
    return {"killed_after_step": killed, "launcher_exit": launcher.returncode}


def check(cmd: list[str], log: Path) -> str:
    """Run ``cmd`` with its output in ``log``; returns the output, or raises if it failed."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return log.read_text()


def eval_losses(console: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"eval at step (\d+): loss ([0-9.]+)", console)}


def generate(hf: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    prompt = tok("The GNU General Public License", return_tensors="pt")
    n = prompt.input_ids.shape[1]

    class ForceEOSAtThird(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - n == 2:
                scores[:] = -torch.inf
                scores[:, tok.eos_token_id] = 0.0
            return scores

    with torch.no_grad():
        free = model.generate(**prompt, do_sample=False, max_new_tokens=40)
        forced = model.generate(**prompt, do_sample=False, max_new_tokens=40,
                                logits_processor=LogitsProcessorList([ForceEOSAtThird()]))
    return {"eos_token_id": tok.eos_token_id, "eos_token": tok.eos_token,
            "greedy_text": tok.decode(free[0, n:]), "greedy_new_tokens": free.shape[1] - n,
            "forced_new_tokens": forced.shape[1] - n, "forced_last_is_eos": forced[0, -1].item() == tok.eos_token_id}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "walkthrough")
    p.add_argument("--corpus-mb", type=float, default=5.0)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-interval", type=int, default=10)
    p.add_argument("--kill-at", type=int, default=26)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    a = p.parse_args()
    if not a.save_interval <= a.kill_at < a.steps:
        p.error(f"--kill-at {a.kill_at} must lie in [--save-interval {a.save_interval}, --steps {a.steps}): a "
                "kill before the first checkpoint resumes from nothing, one at the end kills nothing")
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    logs = a.out / "logs"  # one file per command
    logs.mkdir()
    times, figures = {}, {}

    def phase(name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        times[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {times[name]} s", flush=True)
        return result

    corpus, data, run_dir = a.out / "corpus.jsonl", a.out / "data", a.out / "run"
    figures["corpus"] = phase("corpus", lambda: write_corpus(corpus, a.corpus_mb))
    prepare = [str(BIN / "ds-fp4-data"), "prepare", str(corpus), "--out", str(data), "--vocab-size",
               str(a.vocab_size), "--eval-fraction", "0.02"]
    phase("prepare", lambda: check(prepare, logs / "prepare.log"))
    cfg = a.out / "my-run.json"
    cfg.write_text(json.dumps(run_config(data, run_dir, a), indent=2))
    figures["kill"] = phase("train until kill -9", lambda: train_and_kill(train_cmd(cfg), run_dir, a.kill_at,
                                                                             logs / "killed.log"))
    figures["latest_before_resume"] = (run_dir / "checkpoints" / "latest").read_text()
    resumed = phase("resume to the end", lambda: check(train_cmd(cfg), logs / "resumed.log"))
    ref_dir = a.out / "reference"
    reference = phase("reference run, uninterrupted", lambda: check(
        train_cmd(cfg, f"trainer.out_dir={json.dumps(str(ref_dir))}"), logs / "reference.log"))
    ours, ref = losses(run_dir), losses(ref_dir)
    figures["steps_logged_once"] = [s for s, _ in ours] == list(range(1, a.steps + 1))
    figures["resume_bitwise"] = ours == ref
    figures["final_loss"] = ours[-1][1]
    figures["eval_losses"] = eval_losses(reference)
    after = {s: v for s, v in figures["eval_losses"].items() if s > int(figures["latest_before_resume"][5:])}
    figures["resumed_eval_equal"] = eval_losses(resumed) == after
    figures["resume_said"] = [line for line in resumed.splitlines() if line.startswith(("resumed from", "steps.jsonl"))]
    last = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    hf = a.out / "hf"
    phase("export", lambda: check([sys.executable, "-m", "launch.export", str(last), str(hf)],
                                                logs / "export.log"))
    figures["generate"] = phase("generate", lambda: generate(hf))
    gen = figures["generate"]
    ok = (figures["steps_logged_once"] and figures["resume_bitwise"] and figures["resumed_eval_equal"]
          and gen["forced_new_tokens"] == 3
          and gen["forced_last_is_eos"] and figures["kill"]["launcher_exit"] != 0)
    result = {"bench": "walkthrough", "date": datetime.date.today().isoformat(), "cpu": cpu_model(),
              "args": {k: str(v) for k, v in vars(a).items()}, "seconds": times,
              "total_seconds": round(sum(times.values()), 1), "figures": figures, "ok": ok}
    result = json.loads(json.dumps(result).replace(str(REPO) + "/", ""))  # paths relative to the repository
    print(json.dumps(result, indent=1))
    a.results.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    (a.results / f"walkthrough_{name}_{result['date']}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
