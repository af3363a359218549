"""The continuous-batching scheduler against a fake runner that mirrors the native context's KV lengths."""

from __future__ import annotations

import pytest

from engine.serving.scheduler import QueueFullError, Scheduler, SchedulerConfig


class FakeRunner:
    """Applies a schedule like the engine core would and checks each token lands at its slot's next position."""

    def __init__(self, slots: int):
        self.kv = [[] for _ in range(slots)]
        self.released = []

    def run(self, sched: Scheduler) -> dict[str, int]:
        plan = sched.schedule()
        for src, dst, n in plan.copies:
            self.kv[dst] = list(self.kv[src][:n])
        for slot, n in plan.truncations:
            assert n <= len(self.kv[slot])
            self.kv[slot] = self.kv[slot][:n]
        sampled = {}
        for chunk in plan.chunks:
            assert chunk.start == len(self.kv[chunk.slot]), "a chunk must continue its slot's KV"
            self.kv[chunk.slot] += chunk.tokens
            if chunk.samples:
                sampled[chunk.request_id] = 1000 + len(self.kv[chunk.slot])
        return sampled, plan


def _drive(sched, runner, lengths: dict[str, int], steps=200):
    """Run until every request generated `lengths[id]` tokens; returns the generated tokens per id and the plans."""
    out = {r: [] for r in lengths}
    plans = []
    for _ in range(steps):
        if not sched.has_work():
            break
        sampled, plan = runner.run(sched)
        plans.append(plan)
        for rid, token in sampled.items():
            out[rid].append(token)
            if len(out[rid]) >= lengths[rid]:
                for slot in sched.finish(rid):
                    runner.kv[slot] = []
                    runner.released.append(slot)
            else:
                sched.append_token(rid, token)
    return out, plans


def test_requests_join_and_leave_at_token_boundaries():
    sched = Scheduler(SchedulerConfig(slots=2, max_context=64, prefill_chunk=8, prefix_cache_slots=2))
    runner = FakeRunner(2)
    sched.add("a", list(range(5)))
    sched.add("b", list(range(10, 13)))
    sched.add("c", list(range(20, 24)))  # waits for a slot
    out, plans = _drive(sched, runner, {"a": 3, "b": 6, "c": 2})
    assert [len(v) for v in out.values()] == [3, 6, 2]
    assert max(len(p.chunks) for p in plans) == 2  # never more sequences than slots
    assert not sched.has_work()


def test_long_prompt_is_chunked_and_decoders_keep_going():
    sched = Scheduler(SchedulerConfig(slots=2, max_context=256, prefill_chunk=16))
    runner = FakeRunner(2)
    sched.add("short", [1, 2, 3])
    runner.run(sched)  # short prefilled, now decoding
    sched.append_token("short", 7)
    sched.add("long", list(range(100, 200)))
    steps_with_decode = 0
    for _ in range(7):
        _, plan = runner.run(sched)
        kinds = {c.request_id: len(c.tokens) for c in plan.chunks}
        assert kinds.get("long", 0) <= 16
        if "short" in kinds:
            steps_with_decode += 1
            sched.append_token("short", 8)
    assert steps_with_decode == 7  # the decoding stream got a token in every step of the long prefill


def test_prefix_reuse_from_idle_and_running_slots():
    system = list(range(50, 80))
    sched = Scheduler(SchedulerConfig(slots=3, max_context=128, prefill_chunk=64))
    runner = FakeRunner(3)
    sched.add("first", system + [1, 2])
    _drive(sched, runner, {"first": 2})
    assert sched.prefix_hits == 0
    sched.add("second", system + [3, 4, 5])  # the idle slot still holds `first`'s KV
    sampled, plan = runner.run(sched)
    assert plan.truncations and plan.chunks[0].start == len(system)
    assert sched.prefix_tokens_reused == len(system)
    sched.append_token("second", sampled["second"])
    sched.add("third", system + [9])  # copied from the running `second`
    _, plan = runner.run(sched)
    assert plan.copies and plan.copies[0][2] == len(system)
    assert runner.kv[plan.copies[0][1]][: len(system)] == system


def test_identical_prompt_keeps_one_token_to_compute():
    sched = Scheduler(SchedulerConfig(slots=1, max_context=64))
    runner = FakeRunner(1)
    sched.add("a", [1, 2, 3, 4])
    _drive(sched, runner, {"a": 1})
    sched.add("b", [1, 2, 3, 4])
    _, plan = runner.run(sched)
    assert plan.chunks[0].tokens == [4] and plan.chunks[0].samples


def test_prompt_scoring_reuses_only_what_comes_before_the_scored_positions():
    sched = Scheduler(SchedulerConfig(slots=1, max_context=64))
    runner = FakeRunner(1)
    sched.add("a", [1, 2, 3, 4])
    _drive(sched, runner, {"a": 1})
    sched.add("b", [1, 2, 3, 4, 5], logits_from=0)  # echo: every position's logits
    _, plans = _drive(sched, runner, {"b": 1})
    assert plans[0].chunks[0].start == 0 and plans[0].chunks[0].logits_from == 0
    sched.add("c", [1, 2, 3, 9, 9], logits_from=2)  # a continuation scored from position 2 on
    _, plans = _drive(sched, runner, {"c": 1})
    assert plans[0].chunks[0].start == 2 and plans[0].chunks[0].logits_from == 2
    with pytest.raises(ValueError, match="outside the prompt"):
        sched.add("d", [1, 2], logits_from=2)


def test_the_queue_waits_for_a_shared_prefix_then_copies_it():
    """Four choices of one question: the first computes the context, the others copy it (batch scoring)."""
    context = list(range(1, 41))
    sched = Scheduler(SchedulerConfig(slots=4, max_context=64, prefill_chunk=64, wait_for_shared_prefix=8))
    runner = FakeRunner(4)
    for i in range(4):
        sched.add(f"c{i}", [*context, 100 + i], logits_from=len(context) - 1)
    sched.add("other", [7, 7, 7])
    _, first = runner.run(sched)
    assert [c.request_id for c in first.chunks] == ["c0"]  # the rest wait for the context
    out, plans = _drive(sched, runner, {"c0": 1, "c1": 1, "c2": 1, "c3": 1, "other": 1})
    fed = sum(len(c.tokens) for p in [first, *plans] for c in p.chunks)
    assert fed == len(context) + 1 + 3 * 2 + 3  # c1..c3 feed the context's last token and their own
    assert sched.prefix_tokens_reused == 3 * (len(context) - 1)
    # a prefix shared by a header only (under half of the prompt) is not worth the wait
    sched = Scheduler(SchedulerConfig(slots=2, max_context=64, prefill_chunk=64, wait_for_shared_prefix=8))
    sched.add("x", [*range(1, 11), *range(200, 230)])
    sched.add("y", [*range(1, 11), *range(300, 330)])
    assert [c.request_id for c in FakeRunner(2).run(sched)[1].chunks] == ["x", "y"]


def test_idle_slots_beyond_the_cache_are_released():
    sched = Scheduler(SchedulerConfig(slots=4, max_context=64, prefix_cache_slots=1))
    runner = FakeRunner(4)
    for i in range(4):
        sched.add(f"r{i}", [i * 10 + 1, i * 10 + 2])
    _drive(sched, runner, {f"r{i}": 2 for i in range(4)})
    assert len(runner.released) == 3
    assert sum(1 for s in sched.slots if s.allocated) == 1


def test_queue_bound_and_bad_prompts():
    sched = Scheduler(SchedulerConfig(slots=1, max_context=8, max_queue=1))
    sched.add("a", [1])
    sched.schedule()  # a takes the slot
    sched.add("b", [1])
    with pytest.raises(QueueFullError):
        sched.add("c", [1])
    with pytest.raises(ValueError, match="does not fit"):
        sched.add("d", list(range(8)))
    with pytest.raises(ValueError, match="at least one"):
        sched.add("e", [])
    assert sched.finish("b") == [] and sched.num_waiting == 0  # a waiting request can be cancelled


def test_a_failed_forward_leaves_no_prefix_to_reuse():
    """A forward that fails after the schedule counted its chunks computed: unwinding puts the requests and slots
    back where the chunks started, so a later identical prompt recomputes instead of reusing unwritten KV."""
    prompt = list(range(50, 90))
    sched = Scheduler(SchedulerConfig(slots=2, max_context=128, prefill_chunk=64))
    sched.add("failed", prompt)
    plan = sched.schedule()  # the forward of this plan "fails"
    assert plan.chunks and sched.running["failed"].computed == len(prompt)
    sched.unwind(plan)
    assert sched.running["failed"].computed == 0
    sched.finish("failed")
    sched.add("again", prompt)
    plan = sched.schedule()
    assert plan.chunks[0].start == 0 and not plan.copies and sched.prefix_tokens_reused == 0
