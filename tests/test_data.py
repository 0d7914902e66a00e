"""Prompt files for the real presets (docs/training.md §1): .txt and .jsonl, metadata riding on the prompt string."""

from __future__ import annotations

import pickle

import pytest

from rtdmd.data import Prompt, load_prompts, prompt_metadata


def test_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "two cats", "tag": "counting", "include": [{"class": "cat"}]}\n'
                                      '\n{"prompt": "a red cube"}\n')
    prompts = load_prompts(tmp_path / "p.jsonl")
    assert prompts == ["two cats", "a red cube"] and all(isinstance(p, str) for p in prompts)
    assert prompt_metadata(prompts[0]) == {"tag": "counting", "include": [{"class": "cat"}]}
    assert prompt_metadata(prompts[1]) == {} and prompt_metadata("plain") == {}
    again = pickle.loads(pickle.dumps(prompts[0]))  # survives process boundaries with its record
    assert again == "two cats" and again.metadata == prompts[0].metadata
    assert {prompts[0]: 1}["two cats"] == 1  # hashes and compares as its text


@pytest.mark.parametrize("name,text,needle", [
    ("missing.txt", None, "no such file"),
    ("p.csv", "a,b\n", "expected a .txt or .jsonl"),
    ("p.jsonl", "{not json}\n", "p.jsonl:1: not JSON"),
    ("p.jsonl", '{"prompt": "ok"}\n{"text": "no prompt"}\n', 'p.jsonl:2: expected an object with a string "prompt"'),
    ("p.txt", "\n\n", "holds no prompts"),
])
def test_bad_files_name_the_key_and_line(tmp_path, name, text, needle):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="data.eval_prompts") as e:
        load_prompts(tmp_path / name, key="data.eval_prompts")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert Prompt("x", {"a": 1}).metadata == {"a": 1}


def test_stage2_trains_on_its_own_prompts_when_given(tmp_path):
    """The reference's stage 1 trains on PickScore prompts and stage 2 on GenEval's metadata prompts."""
    from rtdmd.config import load_config
    from rtdmd.distributed import DistEnv
    from rtdmd.worlds import Diffusion

    def stage_prompts(cfg, stage):
        return Diffusion(cfg, DistEnv(), run=None).prompts(stage)

    (tmp_path / "s1.txt").write_text("a cat\na dog\n")
    (tmp_path / "s2.jsonl").write_text('{"prompt": "two cats", "tag": "counting"}\n')
    base = [f"data.train_prompts={tmp_path / 's1.txt'}"]
    cfg = load_config("toy", overrides=[*base, f"data.stage2_prompts={tmp_path / 's2.jsonl'}"])
    assert stage_prompts(cfg, 1) == ["a cat", "a dog"]
    assert stage_prompts(cfg, 2) == ["two cats"] and stage_prompts(cfg, 2)[0].metadata == {"tag": "counting"}
    assert stage_prompts(load_config("toy", overrides=base), 2) == ["a cat", "a dog"]
