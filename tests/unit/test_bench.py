"""The benchmark suite: `--quick` on the tiny model writes every file; data are varied and held out."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from absorber_memory.bench.data import CHITCHAT_QUERIES, chitchat_conversations, haystack_text, persona_conversation
from absorber_memory.cli import main
from absorber_memory.probes import DEFAULT_PROBES


def test_quick_bench_writes_json_tables_and_plots(tmp_path, capsys):
    assert main(["bench", "all", "--quick", "--model", "tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    for name in ("fidelity", "latency", "ablations", "streaming"):
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


def test_quick_streaming_compares_every_memory_on_the_agent_path(tmp_path):
    assert main(["bench", "streaming", "--quick", "--model", "tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "streaming.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["full", "truncation", "summary", "one-shot", "stream-history", "stream-chained"]
    assert rows["full"]["kl"] == pytest.approx(0.0, abs=1e-6) and rows["truncation"]["gap_closed"] == 0.0
    # the chained row's consolidation (a default) is taught by the frozen model reading the whole history
    assert rows["stream-history"]["teachers"] == "frozen,history" and rows["stream-chained"]["teachers"] == (
        "chained,frozen,history"
    )
    assert [j["kind"] for j in data["raw"]["stream-chained"][0]["jobs"]][-1] == "consolidation"
    for name in ("one-shot", "stream-history", "stream-chained"):
        assert rows[name]["absorbed_tokens"] > 0 and rows[name]["x_prefill_4k"] > 0
        assert rows[name]["steps_per_round"] > 0
        # the tokens the steps read, which the training FLOP/s counts (no `window_grad_every` here: every step all)
        jobs = [j for r in data["raw"][name] for j in r["jobs"]]
        assert all(j["step_tokens"] == j["steps"] * (j["sync_tokens"] + j["heldout_tokens"]) > 0 for j in jobs)
        assert all(j["step_attention_pairs"] > j["step_tokens"] for j in jobs)  # each token sees itself and more
        assert rows[name]["work_gflops"] > rows[name]["train_gflops"] > 0  # attention on top of the linear layers
    sessions = len(data["chats"])
    assert rows["truncation"]["gap_per_session"] == " / ".join(["0.00"] * sessions)
    if sessions == 1:  # one session: its gap is the pooled one
        assert float(rows["one-shot"]["gap_per_session"]) == pytest.approx(rows["one-shot"]["gap_closed"], abs=0.006)
    assert data["prefill_s_per_token_4k"] > 0 and data["matmul_peak_gflops"] > 0
    assert data["model_matmul_peak_gflops"] > 0 and data["model_matmul_tokens"] > 0
    assert data["settings"]["split"] == "test" and (tmp_path / "streaming.png").exists()
    summary = data["raw"]["summary"][0]["summary"]
    assert isinstance(summary, str)
    # The trade-off script reads these results: one point per absorbing row, cheapest first.
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "tradeoff_curve.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "streaming.json"), "--out", str(tmp_path / "curve.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    listed = [line.split(" | ")[0].strip("| ") for line in done.stdout.splitlines()[2:] if line.startswith("| ")]
    assert sorted(listed) == ["one-shot", "stream-chained", "stream-history"] and (tmp_path / "curve.png").exists()


def test_tradeoff_curve_keeps_a_row_name_with_another_result(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "tradeoff_curve.py"
    spec = importlib.util.spec_from_file_location("tradeoff_curve", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(name: str, gaps: dict) -> Path:
        rows = [{"method": m, "kl": 0.03 * (1 - g), "s_per_absorbed_token": 0.1, "x_prefill_4k": 40.0,
                 "gap_closed": g, "relative_recall": None} for m, g in gaps.items()]
        rows.append({"method": "truncation", "kl": 0.03, "s_per_absorbed_token": None})
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"rows": rows}))
        return path

    first = run("a", {"one-shot": 0.1, "stream-history": 0.2})
    again = run("b", {"one-shot": 0.1, "stream-history": 0.2})  # the same settings run again
    other = run("c", {"one-shot": 0.1, "stream-history": 0.7})  # `stream-history` under other --set's
    got = module.points([first, again, other])
    assert sorted((p["method"], p["run"]) for p in got) == [("one-shot", "a"), ("stream-history", "a"),
                                                           ("stream-history", "c")]
    assert [p["gap_closed"] for p in got if p["method"] == "stream-history"] == [0.2, 0.7]


def test_streaming_dev_and_test_sessions_never_overlap():
    from absorber_memory.bench.cli import STREAMING
    from absorber_memory.bench.streaming import agent_chats

    for size in STREAMING.values():
        assert not set(size["dev"]) & set(size["test"])
    dev = agent_chats([100], 6, chitchat_seed=1, queries=3)
    test = agent_chats([0], 6, chitchat_seed=0, queries=3)
    assert dev[0].messages[8:] != test[0].messages[8:]  # different real chats after the facts
    assert dev[0].messages[0]["content"] != test[0].messages[0]["content"]
    assert all(not set(c.queries) & set(DEFAULT_PROBES) for c in dev + test)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (["--set", "probe_count"], SystemExit, "KEY=VALUE"),
        (["--set", "no_such_field=1"], ValueError, "no_such_field"),
        (["--set", "probe_count=-1"], ValueError, "probe_count"),
        (["--set", "streaming_teacher=oracle"], ValueError, "streaming_teacher"),
    ],
)
def test_streaming_bad_overrides_fail_before_anything_runs(tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        main(["bench", "streaming", "--quick", "--model", "tiny", "--out", str(tmp_path), *args])
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


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


def test_agent_loop_script_runs_on_the_tiny_model(tmp_path):
    """The scripts under benchmarks/ use the public API only; run one end to end so it cannot rot."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "loop.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/agent_loop.py", "--tiny", "--sessions", "2", "--turns", "3", "--json", str(out)],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data and "adapter switch" in done.stdout
    plain, absorbing = data["runs"]
    assert plain["max_window_tokens"] >= absorbing["max_window_tokens"] > 0  # absorption holds the prompt down
    for run in (plain, absorbing):
        assert 0 < run["max_prompt_tokens"] <= run["max_window_tokens"]  # a prompt holds the window or less


def test_agent_loop_script_names_a_bad_set_pair():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "benchmarks/agent_loop.py", "--tiny", "--set", "max_steps"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "--set: expected KEY=VALUE, got 'max_steps'" in done.stderr


def test_cued_questions_end_their_prompt_with_the_answer_start(make_memory):
    from absorber_memory.bench.methods import query_prompt
    from absorber_memory.bench.streaming import agent_chats

    plain, cued = persona_conversation(3), persona_conversation(3, cued=True)
    assert plain.cues == [] and len(cued.cues) == len(cued.queries)
    assert not any(k.lower() in c.lower() for c, ks in zip(cued.cues, cued.keywords, strict=True) for k in ks)
    pm = make_memory()
    asked = query_prompt(pm, cued, cued.prefix, cued.window, 0)
    bare = query_prompt(pm, plain, plain.prefix, plain.window, 0)
    cue = pm.tokenizer.encode(cued.cues[0], add_special_tokens=False)
    assert asked == bare + cue and len(cue) > 0
    chat = agent_chats([5], 2, 0, 3)[0]
    assert chat.cues == persona_conversation(5, cued=True).cues[:3]


def stream_variant(tmp_path, name, *settings):
    """Run the quick streaming bench on the tiny model with one variant row; its JSON and rows by method."""
    argv = ["bench", "streaming", "--quick", "--model", "tiny", "--threads", "1", "--out", str(tmp_path),
            "--teachers", "history", "--variant", name, *settings]
    assert main(argv) == 0
    data = json.loads((tmp_path / "streaming.json").read_text())
    return data, {r["method"]: r for r in data["rows"]}


def test_streaming_variants_add_rows_with_their_overrides(tmp_path):
    data, rows = stream_variant(tmp_path, "plain", "sync_recitation=off", 'losses={"l1":1}')
    assert list(rows) == ["full", "truncation", "summary", "one-shot", "stream-history", "stream-plain"]
    assert data["settings"]["streams"]["stream-plain"] == {"sync_recitation": "off", "losses": {"l1": 1}}
    plain_jobs = [j for j in data["raw"]["stream-plain"][0]["jobs"] if j["kind"] == "round"]
    default_jobs = [j for j in data["raw"]["stream-history"][0]["jobs"] if j["kind"] == "round"]
    assert sum(j["sync_tokens"] for j in default_jobs) > sum(j["sync_tokens"] for j in plain_jobs)  # quotes trained


def test_a_consolidating_stream_counts_its_seconds_but_not_its_tokens(tmp_path):
    data, rows = stream_variant(tmp_path, "nocons", "consolidate_when_idle=null")
    plain, cons = data["raw"]["stream-nocons"][0], data["raw"]["stream-history"][0]  # the default consolidates
    assert [j["kind"] for j in cons["jobs"]] == [j["kind"] for j in plain["jobs"]] + ["consolidation"]
    assert cons["jobs"][-1]["context_tokens"] > 0  # it re-taught the whole history ...
    assert rows["stream-history"]["absorbed_tokens"] == rows["stream-nocons"]["absorbed_tokens"]  # ... absorbed nothing
    assert cons["seconds"] == pytest.approx(sum(j["seconds"] for j in cons["jobs"]))
    assert cons["seconds"] > sum(j["seconds"] for j in cons["jobs"][:-1])


@pytest.mark.parametrize("spec", [["history", "probe_count=1"], ["x"], ["a=b"]])
def test_bad_streaming_variants_are_refused(tmp_path, spec):
    with pytest.raises(SystemExit, match="--variant"):
        main(["bench", "streaming", "--quick", "--model", "tiny", "--out", str(tmp_path), "--variant", *spec])
    from absorber_memory import ConfigError

    with pytest.raises(ConfigError, match="`sync_recitation` input should be"):
        main(["bench", "streaming", "--quick", "--model", "tiny", "--out", str(tmp_path), "--variant", "v",
              "sync_recitation=sometimes"])
    assert not (tmp_path / "streaming.json").exists()  # refused before anything ran


def test_pooled_rows_split_the_gap_by_session_and_by_where_the_reference_is_right():
    from absorber_memory.bench.streaming import pooled_rows

    def result(chat, kls, hits):
        return {"chat": chat, "kl_sum": sum(kls), "tokens": 2 * len(kls), "hit_list": hits,
                "kl_list": kls, "token_list": [2] * len(kls)}  # fmt: skip

    raw = {
        "full": [result("a", [0.0, 0.0], [True, False]), result("b", [0.0, 0.0], [False, True])],
        "truncation": [result("a", [2.0, 2.0], [False, False]), result("b", [4.0, 4.0], [False, False])],
        "x": [result("a", [1.0, 3.0], [True, True]), result("b", [1.0, 8.0], [False, False])],
    }
    rows = {r["method"]: r for r in pooled_rows(raw, prefill_4k=0.001, params=1)}
    x = rows["x"]
    assert x["gap_closed"] == pytest.approx(1 - 13 / 12)  # pooled over all 8 answer tokens
    assert x["gap_per_session"] == "0.00 / -0.12"  # a: 4 vs 4; b: 9 vs 8
    assert x["gap_where_full_right"] == pytest.approx(1 - (1.0 + 8.0) / (2.0 + 4.0))  # a's first, b's second
    assert x["relative_recall"] == pytest.approx(0.5) and rows["full"]["gap_where_full_right"] == 1.0


def test_long_sessions_chain_real_chats_after_the_facts():
    from absorber_memory.bench.streaming import agent_chats

    short = agent_chats([0], 6, chitchat_seed=0, queries=3)[0]
    long = agent_chats([0], 6, chitchat_seed=0, queries=3, chats=3)[0]
    assert long.messages[:8] == short.messages[:8]  # the same persona facts first
    assert len(long.messages) == 8 + 3 * 6 and long.name.endswith("-x3")
    talks = [long.messages[8 + 6 * k : 14 + 6 * k] for k in range(3)]
    assert talks[0] != talks[1] != talks[2]  # three different chats, not one repeated
    assert [m["role"] for m in long.messages[8:]] == ["user", "assistant"] * 9  # turns still alternate


def test_quick_long_streaming_absorbs_in_larger_rounds(tmp_path):
    argv = ["bench", "streaming", "--quick", "--long", "--sessions", "1", "--model", "tiny", "--threads", "1",
            "--teachers", "history", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "streaming.json").read_text())
    settings = data["settings"]
    assert settings["long"] and settings["chats"] == 3 and settings["test"] == [0] and data["chats"][0].endswith("-x3")
    assert settings["config"]["absorb_tokens"] == 60
    assert [r["method"] for r in data["rows"]] == ["full", "truncation", "summary", "one-shot", "stream-history"]
    from absorber_memory.bench.cli import STREAMING

    sizes = [j["context_tokens"] for j in data["raw"]["stream-history"][0]["jobs"]]
    assert len(sizes) > 3 and sum(sizes) / len(sizes) > STREAMING["quick"]["absorb"]  # rounds larger than short ones


@pytest.mark.parametrize("k", ["0", "2", "-1"])
def test_streaming_sessions_out_of_the_split_are_refused(tmp_path, k):
    with pytest.raises(SystemExit, match="--sessions: the test split has 1 sessions, got"):
        main(["bench", "streaming", "--quick", "--model", "tiny", "--sessions", k, "--out", str(tmp_path)])
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_stream_adapting_other_layers_is_scored_with_its_own_adapter_shape(tmp_path):
    data, rows = stream_variant(tmp_path, "top", "lora_layers=[-1]")
    assert rows["stream-top"]["gap_closed"] is not None and rows["stream-top"]["train_gflops"] > 0
    top, every = data["raw"]["stream-top"][0], data["raw"]["stream-history"][0]
    assert top["answers"] != every["answers"] or top["kl_sum"] != every["kl_sum"]  # another adapter was scored


def test_a_stream_with_another_lora_rank_is_scored_with_an_adapter_of_that_rank(tmp_path):
    data, rows = stream_variant(tmp_path, "r4", "lora_rank=4", "lora_alpha=8")
    assert rows["stream-r4"]["gap_closed"] is not None
    small, default = data["raw"]["stream-r4"][0], data["raw"]["stream-history"][0]
    assert small["answers"] != default["answers"] or small["kl_sum"] != default["kl_sum"]


def test_adapter_shape_names_the_settings_an_adapter_is_loaded_with():
    from absorber_memory.bench.streaming import ADAPTER_SHAPE, adapter_shape
    from absorber_memory.config import AbsorberConfig

    base = AbsorberConfig()
    assert adapter_shape(base) == adapter_shape(base.model_copy(update={"lr": 0.5, "max_steps": 3}))
    for key, value in [("lora_rank", 4), ("lora_alpha", 4.0), ("lora_targets", ["q_proj"]), ("lora_layers", [-1])]:
        assert key in ADAPTER_SHAPE and adapter_shape(base.model_copy(update={key: value})) != adapter_shape(base)


def test_step_flops_count_the_backward_down_to_the_lowest_adapted_layer(tokenizer):
    from absorber_memory.bench.streaming import linear_params, step_linear_flops
    from absorber_memory.testing import tiny_model

    model = tiny_model(tokenizer, layers=4)
    every = linear_params(model)
    assert step_linear_flops(model) == 4 * every
    assert step_linear_flops(model, [-1, -2]) == 2 * every + 2 * every // 2  # forward all, backward the top half
    assert step_linear_flops(model, [3, 1]) == 2 * every + 2 * every * 3 // 4


def test_attention_flops_count_each_query_key_pair_forward_and_back(tokenizer):
    from absorber_memory.bench.streaming import attention_pair_flops
    from absorber_memory.testing import tiny_model

    model = tiny_model(tokenizer, layers=4)
    heads = model.config.num_attention_heads
    width = heads * (getattr(model.config, "head_dim", None) or model.config.hidden_size // heads)
    # forward 4 a layer, backward 8 more; 4 more only with a stored window key (no key or value gradients)
    assert attention_pair_flops(model) == (4 * 12 * width, 4 * 4 * width, 4 * 8 * width)
    assert attention_pair_flops(model, [-1]) == (4 * 4 * width + 8 * width, 4 * 4 * width, 4 * 4 * width + 4 * width)


def test_work_flops_add_attention_and_window_refreshes_to_the_linear_layers():
    from absorber_memory.bench.streaming import pooled_rows

    def result(chat, jobs=()):
        return {"chat": chat, "kl_sum": 1.0, "tokens": 1, "hit_list": [False], "kl_list": [1.0], "token_list": [1],
                "jobs": list(jobs), "absorbed_tokens": 10, "seconds": 3.0}  # fmt: skip

    job = {"seconds": 3.0, "teacher_seconds": 1.0, "steps": 2, "sync_tokens": 5, "step_tokens": 8,
           "step_attention_pairs": 100, "step_window_pairs": 60, "refresh_tokens": 4,
           "refresh_attention_pairs": 10}  # fmt: skip
    old = {k: v for k, v in job.items() if "pairs" not in k and "refresh" not in k}  # a job reported before pairs
    raw = {"full": [result("a")], "truncation": [result("a")], "x": [result("a", [job])], "old": [result("a", [old])]}
    rows = {r["method"]: r for r in pooled_rows(raw, 0.001, params=7, step_flops={"x": 28}, pair_flops={"x": (3, 1, 2)})}
    assert rows["x"]["train_gflops"] == pytest.approx(28 * 8 / 2.0 / 1e9)  # the linear layers of the steps only
    # + attention of the steps (40 pairs whole, 60 with a stored window key), the refreshes' layers and attention
    work = 28 * 8 + 3 * 40 + 2 * 60 + 2 * 7 * 4 + 1 * 10
    assert rows["x"]["work_gflops"] == pytest.approx(work / 2.0 / 1e9)
    assert rows["old"]["work_gflops"] is None and rows["old"]["train_gflops"] > 0  # jobs without pairs: not counted


def test_a_variant_with_layers_outside_the_model_fails_before_streaming(tmp_path):
    from absorber_memory import ConfigError

    with pytest.raises(ConfigError, match="`lora_layers` has indices"):
        main(["bench", "streaming", "--quick", "--model", "tiny", "--out", str(tmp_path), "--variant", "v",
              "lora_layers=[9]"])
    assert not (tmp_path / "streaming.json").exists()


def gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_adapters_trained_in_one_place_give_the_same_logits_loaded_in_another(tmp_path):
    """The `--out` / `--verify` round trip, both on this CPU (on a GPU machine the first half runs in bf16)."""
    check = gpu_check()
    trained = check.e2e(tmp_path, device="cpu", dtype=torch.float32)
    assert trained["finite"] and trained["loss_fell"] and trained["adapter_moved_logits"] > 0
    verified = check.verify(tmp_path)
    assert verified["same_argmax"] and verified["max_abs_diff_cpu_vs_gpu"] < 1e-4
    assert verified["max_abs_adapter_effect"] > 1e-3  # the loaded adapter, not the base model, gave them


def test_gpu_check_names_what_is_missing(tmp_path, capsys):
    check = gpu_check()
    with pytest.raises(SystemExit, match="no base.safetensors, adapter, logits.pt there"):
        check.main(["--verify", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            check.main(["--out", str(tmp_path / "out")])
        assert "needs a CUDA GPU" in capsys.readouterr().err
