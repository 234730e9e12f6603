"""The demo on the tiny model: the agent path end to end, the headline, whole answers, JSON and a figure."""

from __future__ import annotations

import json

from absorber_memory.cli import main
from absorber_memory.demo import QUESTIONS, run_demo
from absorber_memory.testing import tiny_model_and_tokenizer


def test_the_demo_absorbs_in_the_background_and_reports_relative_recall(tmp_path, capsys):
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    result = run_demo(str(tmp_path / "tiny"), figure=tmp_path / "demo.png", max_steps=2, probe_count=1,
                      num_threads=1, max_new_tokens=8)  # fmt: skip
    out = capsys.readouterr().out
    summary = result["summary"]
    assert summary["messages absorbed"] > 0 and summary["absorption jobs"] >= 1
    assert all(j["steps"] == 2 for j in result["jobs"])  # every job ran, with the settings given
    assert len(result["answers"]) == len(QUESTIONS)
    full = [r for r in result["answers"] if r["full_correct"]]
    assert summary["full context states"] == len(full)
    assert summary["absorbed states (of those)"] == sum(r["absorbed_correct"] for r in full)
    assert "With the whole chat in its prompt the model states" in out
    assert "absorbing:" in out and "What food am I allergic to?" in out
    for row in result["answers"]:  # whole answers, cue included, nothing cut at a column width
        assert row["absorbed"].startswith(QUESTIONS[result["answers"].index(row)][2])
    assert (tmp_path / "demo.png").stat().st_size > 1000


def test_demo_cli_writes_json_and_a_png_beside_it(tmp_path, capsys):
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    target = tmp_path / "out" / "demo.json"
    target.parent.mkdir()
    capsys.readouterr()  # the model save above prints its own bar; only the demo's output is checked
    assert main(["demo", "--model", str(tmp_path / "tiny"), "--max-steps", "1", "--json", str(target)]) == 0
    assert json.loads(target.read_text())["summary"]["questions"] == len(QUESTIONS)
    assert (tmp_path / "out" / "demo.png").is_file()
    err = capsys.readouterr().err
    assert "it/s" not in err and "Warning" not in err  # no third-party bars or warnings
