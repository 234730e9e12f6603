"""The library's defaults for the agent path: recited sync text, a quarter-weight logit KL, consolidation.

Most tests pin the paper's plain path (`FAST` in conftest); these run `AbsorberMemory` with only the
training budget shrunk, so the defaults themselves are what is exercised.
"""

from __future__ import annotations

from absorber_memory import AbsorberConfig, AbsorberMemory
from absorber_memory.config import PLAIN_RECIPE
from absorber_memory.testing import tiny_model

from ..conftest import SERVICE, turn
from .test_sessions import check_invariants

#: The service settings with the defaults this file is about left alone.
AT_DEFAULTS = {k: v for k, v in SERVICE.items() if k not in PLAIN_RECIPE}


def test_the_defaults_are_the_measured_recall_setting():
    cfg = AbsorberConfig()
    assert cfg.sync_recitation == "after" and cfg.losses == {"l1": 1.0, "logit_kl": 0.25}
    assert cfg.consolidate_when_idle == 0 and cfg.streaming_teacher == "history"


def stream(tokenizer, tmp_path, name: str, **overrides) -> tuple[AbsorberMemory, list[int]]:
    memory = AbsorberMemory(tiny_model(tokenizer), tokenizer=tokenizer, config=AbsorberConfig(**AT_DEFAULTS, **overrides),
                            data_dir=tmp_path / name)  # fmt: skip
    added: list[int] = []
    for i in range(6):
        added += memory.add_messages(turn(i), session_id="s")
    memory.flush()
    return memory, added


def test_a_burst_at_the_defaults_recites_and_ends_with_one_consolidation(tokenizer, tmp_path):
    memory, added = stream(tokenizer, tmp_path, "defaults")
    plain, _ = stream(tokenizer, tmp_path, "plain", **PLAIN_RECIPE)
    try:
        jobs, plain_jobs = memory.jobs("s"), plain.jobs("s")
        assert all(j.status == "done" for j in jobs)
        assert [j.kind for j in jobs] == [j.kind for j in plain_jobs] + ["consolidation"]  # one, after the burst
        assert len(plain_jobs) >= 2 and all(j.kind == "round" for j in plain_jobs)
        check_invariants(memory, "s", added)  # nothing lost or absorbed twice; the consolidation moved the version
        roles = {m.id: m.role for m in memory.transcript("s")}
        rounds = [j for j in jobs if j.kind == "round"]
        for mine, theirs in zip(rounds, plain_jobs, strict=True):
            assert mine.message_ids == theirs.message_ids  # the same rounds, with each absorbed user turn quoted:
            quoted = any(roles[i] == "user" for i in mine.message_ids)
            grew = mine.metrics["sync_tokens"] > theirs.metrics["sync_tokens"]
            assert grew == quoted and (grew or mine.metrics["sync_tokens"] == theirs.metrics["sync_tokens"])
        assert any(roles[i] == "user" for j in rounds for i in j.message_ids)
    finally:
        memory.close()
        plain.close()
