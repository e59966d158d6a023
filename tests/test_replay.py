"""The trace replay (benchmarks/replay_traces.py) runs through the decoding loop on a CPU with a
tiny random-weight target: every recorded tree is verified, in order, and the loop emits exactly
the recorded number of tokens; the committed traces are well-formed."""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
TRACES = sorted((BENCH / "traces").glob("*.json"))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_committed_traces_are_trees_with_accepted_paths():
    assert TRACES, "no committed traces in benchmarks/traces"
    total = 0
    for path in TRACES:
        total += path.stat().st_size
        trace = json.loads(path.read_text())
        assert trace["meta"]["greedy"] and trace["runs"]
        for run in trace["runs"]:
            emitted = 1
            for tokens, parents, accepted, nxt in run["steps"]:
                assert len(tokens) == len(parents) and parents[0] == -1
                assert all(0 <= parents[i] < i for i in range(1, len(parents)))
                assert accepted[0] == 0 and all(parents[b] == a for a, b in zip(accepted, accepted[1:]))
                emitted += len(accepted)
            assert emitted >= len(run["new_tokens"])
    assert total < 4 * 2 ** 20


def test_replay_runs_the_recorded_trees_through_the_loop(tmp_path):
    import parallelspec as ps
    import replay_traces as rt

    source = json.loads(TRACES[0].read_text())
    run = source["runs"][0]
    steps = run["steps"][:5]
    new = 1 + sum(len(s[2]) for s in steps)
    trace = {"meta": source["meta"], "runs": [dict(run, steps=steps, new_tokens=run["new_tokens"][:new])]}
    model = rt.random_target("tiny", torch.device("cpu"), torch.float32)
    ReplayBuilder = rt.replay_builder_class()
    builder = ReplayBuilder(steps, max(len(s[0]) for s in steps))
    drafter = rt.random_drafter(model, 12)
    phases, sizes = rt._Phases(torch.device("cpu"), True), []
    with rt.replaying(builder, drafter, phases, sizes):
        out = ps.generate(model, torch.tensor([run["prompt_ids"]]), drafter, tree=builder, max_new_tokens=new,
                          do_sample=False)
    assert sizes == [len(s[0]) for s in steps]
    assert out.shape[1] - len(run["prompt_ids"]) == new
    # after the first token (the random target's own), the loop emitted the recorded tokens
    assert out[0, len(run["prompt_ids"]) + 1:].tolist() == run["new_tokens"][1:new]
    assert {"draft", "build", "verify", "accept", "commit", "host_sync"} <= set(phases.times)

    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    out_json = tmp_path / "replay.json"
    assert rt.main(["--target", "tiny", "--device", "cpu", "--traces", str(path), "--warmup", "0",
                    "--out", str(out_json)]) == 0
    row, = json.loads(out_json.read_text())["rows"]
    assert row["label"] == "replay" and row["steps"] == 5 and row["new_tokens"] == new
    assert row["replay_tokens_per_s"] > 0
    assert row["speedup_vs_hf_generate"] == pytest.approx(row["replay_tokens_per_s"] / row["hf_generate_tokens_per_s"])
