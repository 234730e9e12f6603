"""Bad input across the public API and both integrations: a clear error, and nothing stored changes.

Each case in `CASES` runs against a memory that already holds a session with
an absorbed adapter and a window. The test takes a snapshot of everything
stored (messages, sessions, jobs, every file under the data directory, by
hash) before the call and checks it is identical after the error. Cases
that open other directories also check those files are left as they were.
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ChatMessage as LCChatMessage
from langchain_core.messages import HumanMessage
from llama_index.core.base.llms.types import ChatMessage

from absorber_memory import (
    AbsorberConfig,
    AbsorberMemory,
    ConfigError,
    InvalidMessageError,
    InvalidSessionError,
    ParametricMemory,
    StorageError,
)
from absorber_memory.persistence import ADAPTER_WEIGHTS
from absorber_memory.layout import session_key
from absorber_memory.testing import tiny_model
from langchain_absorber import AbsorberChatMessageHistory, ChatAbsorber
from llama_index.memory.absorber import AbsorberMemory as LlamaMemory

from ..conftest import FAST, SERVICE, turn


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


@dataclass
class Env:
    core: AbsorberMemory
    tokenizer: Any
    tmp: Path
    make_service: Callable[..., AbsorberMemory]

    def open(self, data_dir: Path, **overrides: Any) -> AbsorberMemory:
        return self.make_service(data_dir=data_dir, **overrides)

    def snapshot(self) -> tuple[Any, ...]:
        core = self.core
        messages = [(m.id, m.session_id, m.role, m.content, m.absorbed_version, m.key)
                    for sid in core.sessions() for m in core.transcript(sid)]
        jobs = [(j.id, j.session_id, j.status) for j in core.jobs()]
        files = {str(p.relative_to(core.data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted((core.data_dir / "sessions").rglob("*")) if p.is_file()}
        return core.sessions(), messages, jobs, files


@pytest.fixture
def env(make_service, tokenizer, tmp_path):
    core = make_service()
    for k in range(3):
        core.add_messages(turn(k), session_id="s", user_id="alice")
    core.add_messages(user("keyed"), session_id="k", keys=["id-1"])
    core.flush()
    assert core.adapter_path("s") is not None and core.window("s")  # an adapter and a window to protect
    return Env(core, tokenizer, tmp_path, make_service)


def unchanged(path: Path) -> Callable[[], None]:
    """A check that `path`'s bytes are what they are now."""
    before = path.read_bytes()
    return lambda: (path.read_bytes() == before) or pytest.fail(f"{path} was modified")


# --- cases that need a little setup ---------------------------------------------------------------
def late_system_message(env: Env) -> None:
    env.core.add_messages([{"role": "system", "content": "New rules."}], session_id="s")


def other_users_session(env: Env) -> None:
    env.core.add_messages(turn(9), session_id="s", user_id="mallory")


def duplicate_key(env: Env) -> None:
    env.core.add_messages(user("two"), session_id="k", keys=["id-1"])  # the fixture stored "id-1" already


def window_larger_than_the_model(env: Env) -> None:
    target = env.tmp / "huge-window"
    try:
        env.open(target, window_tokens=10**9)
    finally:
        assert not target.exists()  # refused before anything was created on disk


def adapter_for_another_model(env: Env) -> None:
    memory = ParametricMemory(tiny_model(env.tokenizer, hidden_size=48), tokenizer=env.tokenizer, config=FAST)
    memory.add_messages(turn(0))
    saved = memory.save(env.tmp / "other-model")
    ParametricMemory.load(saved, tiny_model(env.tokenizer), tokenizer=env.tokenizer)


def corrupted_saved_memory(env: Env) -> None:
    memory = ParametricMemory(tiny_model(env.tokenizer), tokenizer=env.tokenizer, config=FAST)
    memory.add_messages(turn(0))
    saved = memory.save(env.tmp / "saved")
    (saved / "adapter" / ADAPTER_WEIGHTS).write_bytes(b"\x00garbage" * 50)
    ParametricMemory.load(saved, tiny_model(env.tokenizer), tokenizer=env.tokenizer)


def corrupted_adapter_in_use(env: Env) -> None:
    weights = env.core.adapter_path("s") / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:200])  # torn by something outside our control
    env.core.adapters.evict(session_key("s"))  # so the next use reads the file again
    env.core.generate(session_id="s")


def another_base_model_in_the_data_dir(env: Env) -> None:
    env.core.close()
    check = unchanged(env.core.data_dir / "absorber.db")
    try:
        AbsorberMemory(tiny_model(env.tokenizer, hidden_size=48), tokenizer=env.tokenizer, config=SERVICE,
                       data_dir=env.core.data_dir)
    finally:
        check()


def corrupted_database(env: Env) -> None:
    target = env.tmp / "corrupt-db"
    target.mkdir()
    (target / "absorber.db").write_bytes(b"this is not a database " * 100)
    check = unchanged(target / "absorber.db")
    try:
        env.open(target)
    finally:
        check()


def database_locked_by_another_program(env: Env) -> None:
    other = sqlite3.connect(env.core.data_dir / "absorber.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # a backup tool, say, holding the write lock
    env.core.store._db.execute("PRAGMA busy_timeout = 200")  # fail fast instead of the 5 s default
    try:
        env.core.add_messages(turn(7), session_id="s")
    finally:
        other.execute("ROLLBACK")
        other.close()


def database_full(env: Env) -> None:
    db = env.core.store._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own way to simulate a full disk
    try:
        env.core.add_messages([{"role": "user", "content": f"{k} " + "words " * 300} for k in range(10)], session_id="s")
    finally:
        db.execute("PRAGMA max_page_count = 1073741823")


def data_dir_is_a_file(env: Env) -> None:
    target = env.tmp / "a-file"
    target.write_text("not a directory")
    env.open(target)


def data_dir_not_writable(env: Env) -> None:
    env.open(Path("/proc/absorber-memory-test"))  # the kernel refuses, even to root


def langchain_history(env: Env) -> AbsorberChatMessageHistory:
    return AbsorberChatMessageHistory(env.core, "s")


def llama_memory(env: Env) -> LlamaMemory:
    return LlamaMemory(env.core, session_id="s")


@dataclass
class Case:
    name: str
    call: Callable[[Env], Any]
    error: type[BaseException]
    match: str
    damages_files: bool = False  # the case itself corrupts a file (then only the rows are compared)


CASES = [
    # --- messages, core API ---
    Case("empty message list", lambda e: e.core.add_messages([], session_id="s"), InvalidMessageError, "is empty"),
    Case("messages not a list", lambda e: e.core.add_messages("hello", session_id="s"), InvalidMessageError, "must be a list"),
    Case("message not a dict", lambda e: e.core.add_messages(["hello"], session_id="s"), InvalidMessageError, r"`messages\[0\]` must be a dict"),
    Case("empty content", lambda e: e.core.add_messages(user(""), session_id="s"), InvalidMessageError, "empty or whitespace"),
    Case("whitespace content", lambda e: e.core.add_messages(user(" \n\t "), session_id="s"), InvalidMessageError, "empty or whitespace"),
    Case("None content", lambda e: e.core.add_messages(user(None), session_id="s"), InvalidMessageError, "got NoneType"),
    Case("number content", lambda e: e.core.add_messages(user(42), session_id="s"), InvalidMessageError, "got int"),
    Case("bytes content", lambda e: e.core.add_messages(user(b"hi"), session_id="s"), InvalidMessageError, "got bytes"),
    Case("nested dict content", lambda e: e.core.add_messages(user({"text": "hi"}), session_id="s"), InvalidMessageError, "got dict"),
    Case("multimodal list with no text part", lambda e: e.core.add_messages(
        user([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]), session_id="s"), InvalidMessageError, "no text part"),
    Case("text part whose text is not a string", lambda e: e.core.add_messages(
        user([{"type": "text", "text": 5}]), session_id="s"), InvalidMessageError, r"content\[0\].text` must be a string"),
    Case("unknown role", lambda e: e.core.add_messages([{"role": "wizard", "content": "hi"}], session_id="s"), InvalidMessageError, "got 'wizard'"),
    Case("missing role", lambda e: e.core.add_messages([{"content": "hi"}], session_id="s"), InvalidMessageError, "has no `role`"),
    Case("system message in the middle of a call", lambda e: e.core.add_messages(
        turn(5) + [{"role": "system", "content": "late"}], session_id="s"), InvalidMessageError, "system message after"),
    Case("system message after the conversation started", late_system_message, InvalidMessageError, "must come before"),
    Case("message longer than the context window", lambda e: e.core.add_messages(
        user("word " * 3000), session_id="s"), InvalidMessageError, r"is \d+ tokens; one message must fit"),
    Case("1 MB message", lambda e: e.core.add_messages(user("x" * (1 << 20)), session_id="s"), InvalidMessageError, "1048576 characters"),
    Case("lone surrogate (invalid UTF-8)", lambda e: e.core.add_messages(user("bad \udc80 text"), session_id="s"), InvalidMessageError, "lone surrogate"),
    Case("NUL control character", lambda e: e.core.add_messages(user("a\x00b"), session_id="s"), InvalidMessageError, "NUL"),
    Case("keys of the wrong length", lambda e: e.core.add_messages(turn(5), session_id="s", keys=["a"]), InvalidMessageError, "`keys` must be"),
    Case("duplicate message key", duplicate_key, InvalidMessageError, "already has a message with key 'id-1'"),
    Case("bad message to generate", lambda e: e.core.generate(user(None), session_id="s"), InvalidMessageError, "got NoneType"),
    Case("LangChain message object given to the core", lambda e: e.core.add_messages([HumanMessage(content="hi")], session_id="s"),
         InvalidMessageError, r"got HumanMessage; convert LangChain messages with `langchain_absorber.to_chat_messages"),
    Case("nothing to answer in an empty session", lambda e: e.core.generate(session_id="never-seen"), InvalidMessageError,
         "nothing to answer: session 'never-seen' has no messages"),
    Case("LlamaIndex message object given to the core", lambda e: e.core.add_messages([ChatMessage(role="user", content="hi")],
         session_id="s"), InvalidMessageError, r"got ChatMessage; convert LlamaIndex messages with"),
    Case("raw generation of a message list", lambda e: e.core.generate(user("hi"), session_id="s", raw=True),
         InvalidMessageError, "`raw=True` needs a non-empty string"),
    Case("forget unknown message ids", lambda e: e.core.forget_messages("s", [999_999]), InvalidMessageError, "not messages of session"),
    Case("forget ids that are not ints", lambda e: e.core.forget_messages("s", ["1"]), InvalidMessageError, "list of ints"),
    Case("consolidate an unknown session", lambda e: e.core.consolidate("nobody"), InvalidSessionError, "unknown session"),
    Case("consolidate a malformed session id", lambda e: e.core.consolidate(""), InvalidSessionError, "session"),
    Case("negative idle time", lambda e: AbsorberConfig(consolidate_when_idle=-1), ConfigError, "consolidate_when_idle"),
    # --- ids ---
    Case("session id with NUL", lambda e: e.core.add_messages(turn(5), session_id="a\x00b"), InvalidSessionError, "without NUL"),
    Case("very long session id", lambda e: e.core.add_messages(turn(5), session_id="x" * 5000), InvalidSessionError, "1-1024 characters"),
    Case("empty session id", lambda e: e.core.add_messages(turn(5), session_id=""), InvalidSessionError, "1-1024 characters"),
    Case("session id not a string", lambda e: e.core.transcript(7), InvalidSessionError, "must be a string, got int"),
    Case("session id with a lone surrogate", lambda e: e.core.add_messages(turn(5), session_id="\ud800"), InvalidSessionError, "lone surrogate"),
    Case("another user's session", other_users_session, InvalidSessionError, "belongs to another user_id"),
    # --- config ---
    Case("negative config value", lambda e: AbsorberConfig(window_tokens=-1), ConfigError, "`window_tokens` must be > 0, got -1"),
    Case("zero config value", lambda e: AbsorberConfig(max_steps=0), ConfigError, "`max_steps` must be >= 1, got 0"),
    Case("huge config value", lambda e: AbsorberConfig(lora_rank=10**6), ConfigError, "`lora_rank` must be <= 1024"),
    Case("window larger than the model's context", window_larger_than_the_model, ConfigError, "`window_tokens` \\+ `max_new_tokens` must be <="),
    Case("wrong type in config", lambda e: AbsorberConfig(lr="fast"), ConfigError, "`lr` input should be a valid number"),
    Case("list where a number belongs", lambda e: AbsorberConfig(window_tokens=[512]), ConfigError, "`window_tokens`"),
    Case("unknown config field", lambda e: AbsorberConfig(learning_rate=1e-3), ConfigError, "`learning_rate` is not a known setting"),
    Case("config not a dict", lambda e: AbsorberMemory(tiny_model(e.tokenizer), tokenizer=e.tokenizer, config="fast",
                                                        data_dir=e.tmp / "x"), ConfigError, "`config` must be"),
    # --- ParametricMemory ---
    Case("absorb nothing", lambda e: ParametricMemory(tiny_model(e.tokenizer), tokenizer=e.tokenizer, config=FAST).absorb([]),
         InvalidMessageError, "`context` is empty"),
    Case("adapter made for a different base model", adapter_for_another_model, StorageError, "another base model|hidden_size"),
    Case("corrupted saved adapter", corrupted_saved_memory, StorageError, "corrupt"),
    # --- storage ---
    Case("corrupted adapter file of a live session", corrupted_adapter_in_use, StorageError, "corrupt", damages_files=True),
    Case("data directory of another base model", another_base_model_in_the_data_dir, StorageError, "another base model"),
    Case("corrupted SQLite file", corrupted_database, StorageError, "cannot be opened as the memory database"),
    Case("SQLite file locked by another program", database_locked_by_another_program, StorageError, "locked"),
    Case("disk full while writing messages", database_full, StorageError, "full"),
    Case("data directory is a file", data_dir_is_a_file, StorageError, "cannot be created or written"),
    Case("data directory not writable", data_dir_not_writable, StorageError, "cannot be created or written|not writable"),
    # --- LangChain ---
    Case("LangChain: unsupported message role", lambda e: ChatAbsorber(memory=e.core).invoke(
        [LCChatMessage(role="wizard", content="hi")]), InvalidMessageError, "is not supported"),
    Case("LangChain: history given a NUL message", lambda e: langchain_history(e).add_messages(
        [HumanMessage(content="a\x00b")]), InvalidMessageError, "NUL"),
    Case("LangChain: history with an empty session id", lambda e: AbsorberChatMessageHistory(e.core, ""),
         InvalidSessionError, "1-1024 characters"),
    Case("LangChain: chat model given no messages", lambda e: ChatAbsorber(memory=e.core).invoke([]),
         InvalidMessageError, "empty"),
    # --- LlamaIndex ---
    Case("LlamaIndex: put a message with a lone surrogate", lambda e: llama_memory(e).put(
        ChatMessage(role="user", content="bad \udc80")), InvalidMessageError, "lone surrogate"),
    Case("LlamaIndex: set with a message too long for the model", lambda e: llama_memory(e).set(
        [ChatMessage(role="user", content="word " * 3000)]), InvalidMessageError, "one message must fit"),
    Case("LlamaIndex: unknown from_defaults argument", lambda e: LlamaMemory.from_defaults(e.core, token_limt=5),
         ConfigError, "unexpected arguments: \\['token_limt'\\]"),
    Case("LlamaIndex: session id with NUL", lambda e: LlamaMemory(e.core, session_id="a\x00b"), ValueError, "without NUL"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_a_clear_error_and_changes_nothing(case, env):
    if case.call is data_dir_not_writable and not sys.platform.startswith("linux"):
        pytest.skip("uses /proc")
    before = env.snapshot()
    with pytest.raises(case.error, match=case.match):
        case.call(env)
    if env.core.closed:  # the case closed it to open its directory again
        env.core = env.make_service(data_dir=env.core.data_dir)
    after = env.snapshot()
    assert after[:3] == before[:3]  # sessions, messages, jobs
    if not case.damages_files:
        assert after[3] == before[3]  # every file under the data directory, by hash


def test_the_table_covers_at_least_25_cases():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)
