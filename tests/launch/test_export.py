"""Export end to end (launch/export.py): a real 2-rank run, exported with `python -m launch.export`, loaded and
run with transformers. The special tokens are the run tokenizer's, generate stops at its EOS, the files get
open()'s modes, positions cover the trained length, and a resumed run keeps every run config it was given."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO, child_env, run, write_config

pytestmark = pytest.mark.slow  # a real multi-rank training run

SEQ_LEN = 64  # write_config's data.seq_len
LLAMA_EOS = 2  # the id the export named as EOS before: Llama's default, a plain `"` in the run's BPE


def export_cli(checkpoint: Path, out: Path, umask: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(checkpoint), str(out)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, umask=umask)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory):
    """A 4-step 2-rank run (checkpoint at step 4) and its export under umask 022: (run dir, hf dir)."""
    d = tmp_path_factory.mktemp("export")
    run(write_config(d / "cfg.json", corpus, trainer={"max_steps": 4, "save_interval": 4}), 2)
    export_cli(d / "run" / "checkpoints" / "step_00000004", d / "hf", umask=0o022)
    return d / "run", d / "hf"


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of the run whose files a test may edit; the checkpoint of step 4 in it."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("tensorboard"))
    return dest / "checkpoints" / "step_00000004"


def edit_json(path: Path, **values) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=1))


def test_configs_and_tokenizer_name_the_run_tokenizers_special_tokens(exported):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, hf = exported
    data = json.loads((run_dir / "model" / "data.json").read_text())
    trained = Tokenizer.from_file(str(run_dir / "model" / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.eos_token == "<|endoftext|>" == trained.id_to_token(data["eos_id"])
    assert tok.eos_token_id == data["eos_id"] != LLAMA_EOS
    assert tok.bos_token_id == tok.pad_token_id == tok.eos_token_id  # no pad or BOS of its own: the EOS
    assert tok.model_max_length == data["seq_len"] == SEQ_LEN
    text = 'def main():\n    print("hi")\n'
    assert tok(text).input_ids == trained.encode(text, add_special_tokens=False).ids  # as the data was encoded

    config = json.loads((hf / "config.json").read_text())
    generation = json.loads((hf / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # The EOS stands in as pad only where padding is masked: as config.json's pad it would be the
    # embedding's padding_idx, whose row no fine-tune could train.
    assert config["pad_token_id"] is None
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.get_input_embeddings().padding_idx is None
    assert model.config.max_position_embeddings >= SEQ_LEN


def test_exported_files_get_the_mode_open_gives_under_the_umask(exported):
    _, hf = exported
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in hf.iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert modes == dict.fromkeys(modes, 0o644), modes  # umask 022; safetensors alone wrote 0600


class ForceEOSAt:
    """A logits processor: row r emits the EOS as its `at[r]`-th new token and never before; `banned` ids
    (the EOS and Llama's default eos id) are never generated otherwise, so only the forced EOS can stop a row."""

    def __init__(self, eos: int, at: list[int], banned: list[int], prompt_len: int) -> None:
        self.eos, self.at, self.banned, self.prompt_len = eos, at, banned, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.banned] = -torch.inf
        step = input_ids.shape[1] - self.prompt_len
        for row, at in enumerate(self.at):
            if step == at:
                scores[row] = -torch.inf
                scores[row, self.eos] = 0.0
        return scores


def test_generate_stops_at_the_tokenizers_eos_and_generates_nothing_after_it(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    _, hf = exported
    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf, padding_side="left")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    batch = tok(["def main():\n", "import os\nimport sys\n"], return_tensors="pt", padding=True)
    prompt = batch.input_ids.shape[1]
    force = ForceEOSAt(eos, at=[2, 5], banned=[eos, LLAMA_EOS], prompt_len=prompt)

    def generate(**kw) -> torch.Tensor:  # greedy, with the exported generation_config unless kw overrides it
        with torch.no_grad():
            out = model.generate(**batch, logits_processor=LogitsProcessorList([force]), do_sample=False,
                                 max_new_tokens=12, **kw)
        return out[:, prompt:]

    new = generate()
    assert new.shape[1] == 6  # stopped when the last row emitted its EOS (6th new token), not at 12
    assert new[1, 5] == eos and eos not in new[1, :5]
    assert new[0, 2] == eos and eos not in new[0, :2]
    assert new[0, 3:].tolist() == [pad] * 3  # after its EOS, row 0 gets nothing but padding
    # The export's old special tokens (Llama's eos 2): the same forced EOS does not stop generation.
    old = generate(eos_token_id=LLAMA_EOS, pad_token_id=LLAMA_EOS)
    assert old.shape[1] == 12 and old[0, 2] == eos and old[1, 5] == eos
    assert (old[0, 3:] != pad).all()  # row 0 went on generating after its EOS


def test_a_run_config_with_fewer_positions_than_seq_len_is_exported_with_seq_len(exported, tmp_path):
    """max_position_embeddings 32 < seq_len 64 (a config from before the trainer refused that): with plain RoPE
    the export covers the trained length, computes what the original export computes, and says so. Exported
    under umask 027, so the modes are checked against the umask rather than against a fixed 0644."""
    from transformers import AutoModelForCausalLM

    run_dir, hf = exported
    ckpt = copy_run(run_dir, tmp_path / "run")
    edit_json(tmp_path / "run" / "model" / "config.json", max_position_embeddings=32)
    proc = export_cli(ckpt, tmp_path / "hf", umask=0o027)
    assert "max_position_embeddings 32 < the run's seq_len 64" in proc.stdout
    assert "exported with max_position_embeddings 64" in proc.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == SEQ_LEN
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()} == {0o640}
    ids = torch.arange(1, SEQ_LEN + 1).unsqueeze(0)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(hf)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits
    assert torch.equal(a, b)


def test_a_rope_that_depends_on_max_positions_keeps_it_and_says_why(exported, tmp_path, capsys):
    from launch.export import export

    run_dir, _ = exported
    ckpt = copy_run(run_dir, tmp_path / "run")
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    edit_json(tmp_path / "run" / "model" / "config.json", max_position_embeddings=32, rope_parameters=rope)
    export(ckpt, tmp_path / "hf")
    err = capsys.readouterr().err
    assert "warning: the model config (model/config.json) has max_position_embeddings 32 < the run's seq_len 64" in err
    assert "kept max_position_embeddings 32, because rope_type 'dynamic' derives its frequencies from it" in err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 32


def test_a_tokenizers_own_pad_token_is_kept_and_its_post_processor_adds_nothing(exported, tmp_path, capsys):
    """A user's tokenizer.json with padding (pad token id 5) and a post-processor that adds a BOS."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    from launch.export import export

    run_dir, _ = exported
    ckpt = copy_run(run_dir, tmp_path / "run")
    tok_file = tmp_path / "run" / "model" / "tokenizer.json"
    user = Tokenizer.from_file(str(tok_file))
    pad, bos = user.id_to_token(5), user.id_to_token(7)
    user.enable_padding(pad_id=5, pad_token=pad)
    user.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 7)])
    user.save(str(tok_file))
    assert user.encode("x").ids[0] == 7  # the user's tokenizer adds its BOS

    export(ckpt, tmp_path / "hf")
    assert "post-processor adds special tokens, which training never saw" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tok.pad_token, tok.pad_token_id) == (pad, 5)
    assert tok("x").input_ids == user.encode("x", add_special_tokens=False).ids
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["pad_token_id"] == generation["pad_token_id"] == 5
    assert config["eos_token_id"] == generation["eos_token_id"] == tok.eos_token_id == 0


def test_a_resume_with_another_config_keeps_the_previous_run_config(exported, corpus, tmp_path):
    """A real restart of a copied run with another config (the run is at its last step, so the trainer only
    sets up and stops), then write_run_files itself with that config again and with a third one: every
    config the run was started with survives, numbered in the order they were replaced."""
    from transformers import AutoConfig

    from data_pipeline import DataConfig, TokenDataset
    from launch.export import write_run_files

    run_dir, _ = exported
    copy_run(run_dir, tmp_path / "run")
    first = (tmp_path / "run" / "run_config.json").read_text()
    cfg = write_config(tmp_path / "cfg.json", corpus, trainer={"max_steps": 4, "save_interval": 4, "log_interval": 2})
    second = json.loads(cfg.read_text())
    assert json.loads(first) != second  # out_dir and log_interval differ

    out = run(cfg, 2).output()
    assert f"the previous one is kept as {tmp_path / 'run' / 'run_config.1.json'}" in out
    assert (tmp_path / "run" / "run_config.1.json").read_text() == first
    assert json.loads((tmp_path / "run" / "run_config.json").read_text()) == second

    dataset = TokenDataset(DataConfig(sources=[str(corpus)], seq_len=SEQ_LEN))
    hf_config = AutoConfig.from_pretrained(tmp_path / "run" / "model")
    third = {**second, "trainer": {**second["trainer"], "log_interval": 3}}
    try:
        write_run_files(tmp_path / "run", second, hf_config, dataset)  # the same config again: nothing kept
        assert sorted(p.name for p in (tmp_path / "run").glob("run_config*.json")) == ["run_config.1.json",
                                                                                        "run_config.json"]
        write_run_files(tmp_path / "run", third, hf_config, dataset)
    finally:
        dataset.close()
    assert (tmp_path / "run" / "run_config.1.json").read_text() == first
    assert json.loads((tmp_path / "run" / "run_config.2.json").read_text()) == second
    assert json.loads((tmp_path / "run" / "run_config.json").read_text()) == third
    written = [p for p in (tmp_path / "run").glob("**/*.json") if "checkpoints" not in p.parts]
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o666 & ~current_umask()}
    assert not [p for p in (tmp_path / "run").rglob(".*") if "checkpoints" not in p.parts]  # no temporary file left


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
