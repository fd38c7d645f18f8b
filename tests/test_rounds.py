"""Rounds: dealing a consumer group equally to data-parallel ranks (torch_tq.store.rounds, and the
queue's state for it on a real server)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_tq
from torch_tq import InvalidArgument
from torch_tq.store.rounds import RoundSpec, form_round, parse_spec

T = torch.ones(2)


def _form(ready, spec, weight=lambda i: 1, size=None):
    ready = list(ready)
    return form_round(ready, set(ready).__contains__, spec, weight, size)


# ---------------------------------------------------------------------- forming a round (pure)


def test_a_round_is_dealt_only_when_every_share_fills():
    spec = RoundSpec(rank=0, world_size=2, dp_rank=0, dp_size=2, share=3)
    assert _form(range(5), spec) == (None, 0)
    shares, _ = _form(range(7), spec)
    assert shares == [[0, 1, 2], [3, 4, 5]]  # the oldest first; 6 stays ready


def test_groups_stay_in_one_share_and_incomplete_groups_wait():
    spec = RoundSpec(0, 2, 0, 2, share=4, group_by=2)
    # group 0 = {0, 1} lacks 1; groups 1, 2, 3 = {2,3}, {4,5}, {6,7}; 8's group lacks 9
    shares, _ = _form([0, 2, 3, 4, 5, 8, 6, 7], spec)
    assert shares is None  # three complete groups cannot fill two shares of two groups
    shares, _ = _form([0, 2, 3, 4, 5, 8, 6, 7, 10, 11], spec)
    assert shares == [[2, 3, 4, 5], [6, 7, 10, 11]]
    for share in shares:
        assert {i // 2 for i in share} == {i // 2 for i in share[::2]}


def test_sample_weights_fill_shares_exactly_and_oversize_is_reported():
    rows = {0: 2, 1: 3, 2: 1, 3: 2, 4: 2, 5: 9}
    spec = RoundSpec(0, 2, 0, 2, share=4, unit="sample")
    shares, oversize = _form([5, 0, 1, 2, 3, 4], spec, weight=rows.__getitem__)
    assert oversize == 1  # 5 has 9 rows, more than a share of 4
    assert shares is not None
    assert [sum(rows[i] for i in s) for s in shares] == [4, 4]
    assert 5 not in {i for s in shares for i in s}


def test_balance_by_evens_out_the_sizes_of_a_round():
    sizes = {0: 100, 1: 90, 2: 10, 3: 5, 4: 80, 5: 1}
    spec = RoundSpec(0, 2, 0, 2, share=3, balance_by="seqlen")
    shares, _ = _form(range(6), spec, size=sizes.__getitem__)
    totals = sorted(sum(sizes[i] for i in s) for s in shares)
    unbalanced, _ = _form(range(6), spec)
    plain = sorted(sum(sizes[i] for i in s) for s in unbalanced)
    assert [len(s) for s in shares] == [3, 3]
    assert totals[1] - totals[0] < plain[1] - plain[0]
    assert totals == [115, 171]  # the best split of these six into 3 + 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60), unique=True, max_size=40), st.integers(1, 4),
       st.integers(1, 5), st.integers(1, 3))
def test_a_formed_round_has_equal_shares_of_distinct_ready_ids(ready, dp, per, group_by):
    spec = RoundSpec(0, dp, 0, dp, share=per * group_by, group_by=group_by)
    shares, _ = _form(ready, spec)
    if shares is None:
        return
    dealt = [i for s in shares for i in s]
    assert len(dealt) == len(set(dealt)) and set(dealt) <= set(ready)
    assert [len(s) for s in shares] == [spec.share] * dp
    for s in shares:  # whole groups
        assert all(sum(1 for j in s if j // group_by == i // group_by) == group_by for i in s)


def test_round_specs_are_checked():
    assert parse_spec({"rank": 3, "world_size": 4, "dp_size": 2}, 100).dp_rank == 1
    for bad in ({"rank": 4, "world_size": 4}, {"world_size": 4}, {"rank": 0, "world_size": 4,
                "dp_size": 3}, {"rank": 0, "world_size": 2, "share": 3, "group_by": 2},
                {"rank": 0, "world_size": 2, "unit": "row"}, {"rank": 0, "world_size": 2,
                "extra": 1}, {"rank": True, "world_size": 2}, [], {"rank": 0, "world_size": 2,
                "balance_by": "no spaces"}):
        with pytest.raises(InvalidArgument):
            parse_spec(bad, 100)


# ---------------------------------------------------------------------- on a real server


@pytest.fixture
def c(memory_server):
    with torch_tq.Client(memory_server.location, timeout=60) as client:
        yield client


@pytest.fixture
def names(unique_id):
    return f"g{unique_id}", f"p{unique_id}", unique_id


def _rounds(rank, world, **kw):
    return {"rank": rank, "world_size": world, **kw}


def _drain(c, group, P, rank, world, **kw):
    """Everything one rank is dealt until the group is drained, acknowledged as it goes."""
    got, acks = [], []
    while True:
        lease = c.consume(group, [P], timeout=2, ack=acks, rounds=_rounds(rank, world, **kw))
        if lease.drained:
            return got, lease
        got.append(lease.index_ids)
        acks = lease.index_ids


def test_odd_count_over_two_ranks_gives_equal_shares_and_keeps_the_rest(c, names):
    group, P, base = names
    for i in range(base, base + 11):
        c.put(i, P, T)
    c.finish([P])
    try:
        r0, last0 = _drain(c, group, P, 0, 2, share=2)
        r1, last1 = _drain(c, group, P, 1, 2, share=2)
        assert len(r0) == len(r1) == 2  # two rounds of 2 + 2; 3 ids cannot fill a third
        dealt = [i for s in r0 + r1 for i in s]
        assert len(dealt) == len(set(dealt)) == 8
        assert last0.left == last1.left == 3 and not last0.finished
        status = c.group_status(group)
        assert (status["ready"], status["consumed"], status["rounds"]["dealt"]) == (3, 8, 2)
        # the remainder is still there for a later (here: single) consumer
        rest = c.consume(group, [P], max_items=10)
        assert sorted(rest.index_ids) == sorted(set(range(base, base + 11)) - set(dealt))
    finally:
        c.reopen([P])


def test_members_of_a_dp_rank_get_the_same_shares_and_consume_together(c, names):
    group, P, base = names
    for i in range(base, base + 8):
        c.put(i, P, T)
    # world 4 = 2 dp ranks x 2 members (ranks 0, 1 -> dp 0; ranks 2, 3 -> dp 1)
    kw = {"dp_size": 2, "share": 2}
    a = c.consume(group, [P], rounds=_rounds(0, 4, **kw))
    b = c.consume(group, [P], rounds=_rounds(1, 4, **kw))
    d = c.consume(group, [P], rounds=_rounds(2, 4, **kw))
    assert a.index_ids == b.index_ids and a.round == b.round == d.round == 1
    assert not set(a.index_ids) & set(d.index_ids)
    first = c.ack(group, a.index_ids, rank=0)
    assert first["acked"] == [] and first["waiting"] == a.index_ids
    assert c.group_status(group)["consumed"] == 0
    assert c.ack(group, a.index_ids, rank=0)["waiting"] == a.index_ids  # the same member twice
    assert c.ack(group, a.index_ids, rank=1)["acked"] == a.index_ids
    assert c.group_status(group)["consumed"] == 2
    # rank 3 still receives dp rank 1's first share, then a second round is dealt
    assert c.consume(group, [P], rounds=_rounds(3, 4, **kw)).index_ids == d.index_ids
    assert c.consume(group, [P], rounds=_rounds(3, 4, **kw)).round == 2


def test_every_rank_must_agree_on_the_dealing(c, names):
    group, P, base = names
    for i in range(base, base + 4):
        c.put(i, P, T)
    c.consume(group, [P], rounds=_rounds(0, 2, share=2))
    with pytest.raises(InvalidArgument, match="every rank must pass the same"):
        c.consume(group, [P], rounds=_rounds(1, 2, share=1))
    with pytest.raises(InvalidArgument, match="dp_rank"):
        c.consume(group, [P], rounds=_rounds(0, 2, share=2, dp_size=2, dp_rank=1))
    assert c.group_status(group)["leased"] == 4  # nothing changed by the refusals


def test_a_share_no_member_comes_for_goes_back_when_its_lease_runs_out(c, names):
    group, P, base = names
    for i in range(base, base + 4):
        c.put(i, P, T)
    mine = c.consume(group, [P], lease=0.5, rounds=_rounds(0, 2, share=2))
    c.ack(group, mine.index_ids, rank=0)
    time.sleep(1.0)  # rank 1 never comes
    status = c.group_status(group)
    assert (status["ready"], status["leased"], status["consumed"]) == (2, 0, 2)
    assert status["rounds"]["pending_shares"] == [0, 0]


def test_a_waiting_rank_is_woken_by_the_round_another_write_completes(c, names):
    group, P, base = names
    c.put(base, P, T)
    got = {}

    def rank1():
        got["lease"] = c.consume(group, [P], timeout=10, rounds=_rounds(1, 2))

    t = threading.Thread(target=rank1)
    t.start()
    time.sleep(0.3)
    assert "lease" not in got  # one ready id does not fill a round of two shares
    c.put(base + 1, P, T)
    t.join(10)
    assert len(got["lease"].index_ids) == 1
    assert c.consume(group, [P], rounds=_rounds(0, 2)).round == got["lease"].round


def test_sample_rounds_count_rows_and_balance_reads_sizes(c, names):
    group, P, base = names
    S = f"s{base}"
    for k, rows in enumerate([1, 3, 2, 2, 1, 3]):
        c.put(base + k, P, torch.zeros(rows, 2))
        c.put(base + k, S, torch.tensor(rows * 10))
    kw = {"share": 4, "unit": "sample", "balance_by": S}
    a = c.consume(group, [P], rounds=_rounds(0, 2, **kw))
    b = c.consume(group, [P], rounds=_rounds(1, 2, **kw))
    rows = {base + k: r for k, r in enumerate([1, 3, 2, 2, 1, 3])}
    assert sum(rows[i] for i in a.index_ids) == sum(rows[i] for i in b.index_ids) == 4
