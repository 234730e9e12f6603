"""The benchmark suite: `--quick` on the tiny model writes every file; data are varied and held out."""

from __future__ import annotations

import json
import sys

import pytest

from absorber_memory.bench.data import CHITCHAT_QUERIES, chitchat_conversations, haystack_text, persona_conversation
from absorber_memory.cli import main
from absorber_memory.probes import DEFAULT_PROBES


def test_quick_bench_writes_json_tables_and_plots(tmp_path, capsys):
    assert main(["bench", "all", "--quick", "--model", "tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    for name in ("fidelity", "latency", "ablations"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["quick"] is True and data["machine"]["torch"]
        assert (tmp_path / f"{name}.md").read_text().startswith("| ")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fidelity = json.loads((tmp_path / "fidelity.json").read_text())
    methods = [r["method"] for r in fidelity["rows"]]
    assert methods[:3] == ["full", "truncation", "summary"] and "sync-l1+probes" in methods
    assert set(fidelity["settings"]["dev"]).isdisjoint(fidelity["settings"]["test"])
    assert all(r["steps"] == fidelity["settings"]["steps"] for r in fidelity["rows"] if r["lr"] is not None)
    latency = json.loads((tmp_path / "latency.json").read_text())
    assert {r["setting"] for r in latency["rows"]} == {"full context", "absorber"}
    assert str(tmp_path / "ablations.png") in capsys.readouterr().out


def test_persona_chats_vary_and_queries_are_held_out():
    chats = [persona_conversation(seed) for seed in range(6)]
    assert len({c.context[0]["content"] for c in chats}) > 3
    for chat in chats:
        text = " ".join(m["content"] for m in chat.context)
        assert all(any(k in text for k in keys) for keys in chat.keywords)  # every answer was stated in C
        assert not set(chat.queries) & set(DEFAULT_PROBES)
        assert not {m["content"] for m in chat.window} & set(chat.queries)
    assert not set(CHITCHAT_QUERIES) & set(DEFAULT_PROBES)


def test_real_chats_and_essays_load_offline():
    chats = chitchat_conversations(2, seed=0)
    assert len(chats) == 2 and all(len(c.context) >= 2 and c.window for c in chats)
    assert {m["role"] for c in chats for m in c.context} == {"user", "assistant"}
    assert chats[0].name == chitchat_conversations(2, seed=0)[0].name  # reproducible choice
    assert len(haystack_text(50_000)) >= 50_000


def test_unknown_ablation_factor_is_named(tmp_path):
    from absorber_memory.bench.cli import run

    with pytest.raises(SystemExit, match=r"unknown \['nope'\]; choose from \['absorb_turns'"):
        run("ablations", tmp_path, quick=True, model="tiny", device="cpu", threads=1, factors=["nope"])
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_peak_memory_sees_the_decode_not_the_model_load():
    import torch

    from absorber_memory.bench.latency import peak_mib

    # ru_maxrss (the first version) read 0 here: loading the model had set a higher peak
    assert peak_mib("tiny", 0, 256, 4, torch.device("cpu")) > 0
