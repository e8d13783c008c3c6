"""What a user sees and gets with real 2-rank runs: plain console lines when piped (the ranks here always are),
one line per evaluation and per checkpoint, TensorBoard without DeepSpeed's duplicate lr, file modes that
honour the umask, and the evaluation defaults when a source has no held-out split."""

from __future__ import annotations

import json
import os
import stat

import pytest

from .conftest import run, steps, write_config

pytestmark = pytest.mark.slow  # real multi-rank training runs


@pytest.fixture(scope="module")
def no_eval_source(corpus, tmp_path_factory):
    """A second source with the corpus's tokenizer, prepared without a held-out split (someone else's data)."""
    from data_pipeline import prepare

    out = tmp_path_factory.mktemp("no_eval") / "json_pkg"
    prepare([os.path.dirname(json.__file__)], out, tokenizer=str(corpus / "tokenizer.json"), pattern="*.py",
            workers=0, progress=False)
    assert not (out / "eval").exists()
    return out


def test_a_source_without_a_split_is_left_out_of_the_default_eval_and_the_console_says_what_happens(
        corpus, no_eval_source, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path / "cfg.json", corpus, data={"sources": [str(corpus), str(no_eval_source)]},
                       trainer={"max_steps": 4, "save_interval": 2, "eval_interval": 2, "eval_batches": 1,
                                "log_interval": 2, "progress": True})
    umask = os.umask(0o022)
    try:
        out = run(cfg, 2).output()
    finally:
        os.umask(umask)
    run_dir = tmp_path / "run"
    assert out.count(f"eval: no held-out split in {no_eval_source}; evaluating on {corpus}/eval only") == 1, out
    # Piped stdout: no bar (no carriage returns) although progress is on, a plain line every log_interval.
    assert "\r" not in out
    assert out.count("step 2/4 | loss ") == 1 and out.count("step 4/4 | loss ") == 1
    assert "step 1/4 |" not in out and "step 3/4 |" not in out
    assert "tokens/s" in out.split("step 2/4 | loss ")[1].splitlines()[0]
    for s in (2, 4):
        assert out.count(f"eval at step {s}: loss ") == 1
        assert out.count(f"checkpoint saved at step {s} ({run_dir}/checkpoints/step_0000000{s}, ") == 1
    acc = EventAccumulator(str(run_dir / "tensorboard" / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert [e.step for e in acc.Scalars("train/lr")] == [2, 4]
    assert not [t for t in tags if t.startswith("Train/Samples")], tags  # DeepSpeed's own lr curve is gone
    for name in ("latest", "step_00000004/meta.json", "step_00000004/COMPLETE"):
        assert stat.S_IMODE((run_dir / "checkpoints" / name).stat().st_mode) == 0o644, name
    assert sorted(steps(run_dir)) == [1, 2, 3, 4]


def test_eval_is_not_opened_when_not_asked_for_and_fails_clearly_when_asked_for_on_training_data(
        corpus, no_eval_source, tmp_path):
    data = {"sources": [str(no_eval_source)], "eval_sources": [str(no_eval_source)]}
    cfg = write_config(tmp_path / "cfg.json", corpus, data=data, trainer={"max_steps": 2, "eval_interval": 0})
    out = run(cfg, 2).output()
    assert out.count("eval off: data.eval_sources is set but trainer.eval_interval is 0") == 1
    assert sorted(steps(tmp_path / "run")) == [1, 2]

    elsewhere = json.dumps(str(tmp_path / "asked"))
    asked = run(cfg, 2, ["trainer.eval_interval=1", f"trainer.out_dir={elsewhere}"], expect=78)  # a config error
    message = (f"eval_sources[0] = '{no_eval_source}' is also a training source, so its loss would not be held "
               "out: prepare it with --eval-fraction > 0 (it has no eval/ split)")
    assert asked.output().count(message) == 1, asked.output()[-3000:]  # said once, by rank 0
    assert not (tmp_path / "asked" / "steps.jsonl").exists()  # refused before a step was taken


CONSOLE_SCRIPT = """
import sys
from launch.console import Console
c = Console(rank=0, progress=sys.argv[1] == "true")
c.start(0, 4)
for s in range(1, 5):
    c.step(s, 4, loss=5.0 - s, lr=1e-3, tokens_per_s=100.0 * s if s % 2 == 0 else None, overall_tokens_per_s=50.0)
    if s == 2:
        c.say("checkpoint saved at step 2 (somewhere, 0.1 s)")
c.close()
c.say("done")
"""


@pytest.mark.parametrize("progress", [True, False])
def test_on_a_terminal_progress_chooses_between_the_bar_and_the_lines(progress):
    """A real pseudo-terminal as stdout: progress true draws tqdm's bar (carriage returns) with the messages
    above it and no step lines; false prints the same lines as a pipe gets, every log step."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios
    from pathlib import Path

    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-c", CONSOLE_SCRIPT, str(progress).lower()], stdout=sub,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    os.close(sub)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    out = b"".join(chunks).decode()
    assert "checkpoint saved at step 2 (somewhere, 0.1 s)" in out and "done" in out
    if progress:
        assert "\r" in out.replace("\r\n", "") and "4/4" in out and "loss=1.000" in out
        assert "step 2/4 |" not in out
    else:
        assert "\r" not in out.replace("\r\n", "")  # the terminal turns \n into \r\n; no redraws besides
        assert "step 2/4 | loss 3.0000 | lr 1.000e-03 | 200 tokens/s" in out and "step 4/4 | loss 1.0000" in out
        assert "step 1/4" not in out and "step 3/4" not in out
