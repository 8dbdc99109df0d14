"""`--resume` is guarded by the schema: every key is marked must-match or may-change, and each data file's content
hash is kept in the checkpoint. A resume that would continue a different run is refused in one line naming the key
or the file, before any model loads; an allowed change is logged."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from tests.conftest import write_jsonl
from tuneforge.config import MAY_CHANGE, MUST_MATCH, load_config, resume_marks
from tuneforge.errors import ConfigError
from tuneforge.train import loop
from tuneforge.train.loop import train


def rows(n=24, answer="done"):
    return [{"instruction": f"Echo {i} twice.", "output": f"{i} {i} {answer}"} for i in range(n)]


def base_args(model_dir, data, out):
    return [f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "train.max_steps=2",
            "train.batch_size=4", "train.save_every=1", "lora.dropout=0.0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One 2-step LoRA run; each test resumes a copy of it."""
    folder = tmp_path_factory.mktemp("resume-guard")
    data = write_jsonl(folder / "train.jsonl", rows())
    other = write_jsonl(folder / "other.jsonl", rows(answer="other"))
    train(load_config(None, base_args(tiny_model_dir, data, folder / "run")), show_progress=False)
    return folder / "run", data, other


@pytest.fixture()
def copy_of_run(trained, tmp_path, tiny_model_dir):
    """(run, args): a copy of the trained run in a new output_dir (which may change on resume)."""
    run, data, _ = trained
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", base_args(tiny_model_dir, data, tmp_path / "run")


def refuse_model_loads(monkeypatch) -> None:
    """A refused resume must stop before the expensive part: loading the model fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the resume was refused")

    monkeypatch.setattr(loop, "load_base_model", refuse)


@pytest.fixture()
def no_model_load(monkeypatch):
    refuse_model_loads(monkeypatch)


def test_every_key_is_marked_and_the_data_and_function_keys_must_match():
    marks = resume_marks()
    assert set(marks.values()) == {MUST_MATCH, MAY_CHANGE}
    # The keys the old hand-written list missed: they change the data stream or what the model computes.
    for key in ("data.val_split", "data.overlong", "data.on_error", "data.train_on_prompt", "data.system_prompt",
                "data.train", "data.val", "lora.alpha", "lora.dropout", "adapter.non_linearity", "prompt.init",
                "prompt.init_text", "model", "method", "lora.r", "train.seed", "train.batch_size", "train.grad_accum",
                "data.max_length", "data.packing", "qlora.double_quant", "train.dtype"):
        assert marks[key] == MUST_MATCH, key
    for key in ("train.epochs", "train.max_steps", "train.eval_every", "train.save_every", "train.keep_last",
                "train.report_to", "output_dir"):
        assert marks[key] == MAY_CHANGE, key


@pytest.mark.parametrize("change", [
    "data.val_split=0.25",  # carves validation rows out of train: another training stream
    "data.overlong=drop",
    "data.on_error=skip",
    "data.train_on_prompt=true",  # other labels
    "data.system_prompt=Be brief.",  # other tokens
    "data.max_length=64",
    "lora.alpha=8",  # another function of the same weights
    "lora.dropout=0.1",  # another random stream
    "train.seed=7",  # another data order
])
def test_a_changed_must_match_key_is_refused_in_one_line_naming_it(copy_of_run, no_model_load, change):
    run, args = copy_of_run
    key = change.split("=", 1)[0]
    with pytest.raises(ConfigError) as info:
        train(load_config(None, args + ["train.resume=auto", change]), show_progress=False)
    message = str(info.value)
    assert message.startswith(f"resume: {key} is ") and "step-00000002" in message and "\n" not in message


def test_another_methods_settings_do_not_refuse_a_resume(copy_of_run):
    run, args = copy_of_run  # a LoRA run: the prompt-tuning and adapter sections change nothing it computes
    result = train(load_config(None, args + ["train.resume=auto", "train.max_steps=3", "prompt.init=random",
                                             "adapter.non_linearity=gelu"]), show_progress=False)
    assert result.steps == 3


def test_changed_mixing_weights_are_refused(tmp_path, tiny_model_dir, trained, monkeypatch):
    _, data, other = trained
    mix = [{"path": str(data), "weight": 0.5}, {"path": str(other), "weight": 0.5}]
    args = [a for a in base_args(tiny_model_dir, data, tmp_path / "mix") if not a.startswith("data.train=")]
    train(load_config(None, args + [f"data.train={json.dumps(mix)}"]), show_progress=False)
    mix[0]["weight"] = 0.8
    refuse_model_loads(monkeypatch)
    with pytest.raises(ConfigError, match=r"^resume: data\.train is .* step-00000002 was trained with"):
        train(load_config(None, args + [f"data.train={json.dumps(mix)}", "train.resume=auto"]), show_progress=False)


def test_an_edited_data_file_under_the_same_path_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", rows())
    args = base_args(tiny_model_dir, data, tmp_path / "run")
    train(load_config(None, args), show_progress=False)
    lines = data.read_text().splitlines()
    lines[3] = json.dumps({"instruction": "Echo 3 twice.", "output": "3 3 changed"})  # one answer edited
    data.write_text("\n".join(lines) + "\n")
    refuse_model_loads(monkeypatch)
    with pytest.raises(ConfigError) as info:
        train(load_config(None, args + ["train.resume=auto"]), show_progress=False)
    message = str(info.value)
    assert message.startswith(f"resume: data file {data} changed since checkpoint step-00000002")
    assert "\n" not in message


def test_may_change_keys_resume_and_are_logged(copy_of_run, caplog):
    run, args = copy_of_run
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        result = train(load_config(None, args + ["train.resume=auto", "train.max_steps=3", "train.keep_last=5"]),
                       show_progress=False)
    assert result.steps == 3
    logged = [r.getMessage() for r in caplog.records]
    assert "resume: train.max_steps changed from 2 to 3 (allowed)" in logged
    assert "resume: train.keep_last changed from 3 to 5 (allowed)" in logged
    assert any(m.startswith("resume: output_dir changed") for m in logged)
