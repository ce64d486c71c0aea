"""Token shards and the new + replay batch sampler: seeded, resumable, sharded by rank."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from incr_cli.data.shards import BatchSampler, Draw, open_increment, replay_shares, split_batch_size
from incr_cli.errors import InputError, IntegrityError
from incr_cli.store.workspace import Workspace
from tests.helpers_train import row_ids, tagged_rows, write_increment

T = 16


@pytest.fixture
def ws(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    return ws


def shards(ws: Workspace, sizes: dict[int, int], heldout: int = 3):
    out = []
    for tag, n in sizes.items():
        inc = write_increment(ws, f"t{tag}", tagged_rows(tag, n, T), tagged_rows(tag + 100, heldout, T))
        out.append(open_increment(ws, inc))
    return out


def test_open_increment_maps_both_splits(ws):
    (inc,) = shards(ws, {1: 7})
    assert inc.id == "d0001-t1" and inc.seq_len == T and inc.pad_id == 0
    assert isinstance(inc.train, np.memmap) and inc.train.shape == (7, T)
    assert row_ids(inc.train) == [(1, i) for i in range(7)]
    assert inc.heldout.shape == (3, T)


def test_empty_split_opens_as_zero_rows(ws):
    (inc,) = shards(ws, {1: 5}, heldout=0)
    assert inc.heldout.shape == (0, T)


def test_altered_shard_is_refused(ws):
    (inc,) = shards(ws, {1: 5})
    path = ws.increment_dir(inc.id) / "train.bin"
    data = bytearray(path.read_bytes())
    data[40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="train.bin"):
        open_increment(ws, inc.id)
    path.write_bytes(bytes(data[:-2]))  # truncated: caught even without checksums
    with pytest.raises(IntegrityError, match="bytes"):
        open_increment(ws, inc.id, verify=False)


def test_missing_increment_is_named(ws):
    with pytest.raises(IntegrityError, match="d0009-x"):
        open_increment(ws, "d0009-x")


def test_each_epoch_visits_every_new_sequence_once(ws):
    new = shards(ws, {1: 12, 2: 8})
    sampler = BatchSampler(new, [], Draw(5, seed=3))
    seen = [rid for _ in range(8) for rid in row_ids(sampler.next_batch().new_ids)]  # 40 rows = 2 epochs
    assert Counter(seen[:20]) == Counter(seen[20:]) == Counter([(1, i) for i in range(12)] + [(2, i) for i in range(8)])
    assert seen[:20] != seen[20:]  # a fresh permutation per epoch


def test_replay_ratio_and_sources_are_respected(ws):
    new, *replay = shards(ws, {1: 30, 2: 10, 3: 50})
    n_new, n_replay = split_batch_size(8, 0.25, has_replay=True)
    assert (n_new, n_replay) == (6, 2)
    sampler = BatchSampler([new], replay, Draw(n_new, n_replay, seed=0))
    counts = Counter()
    for _ in range(200):
        batch = sampler.next_batch()
        assert batch.new_ids.shape == (6, T) and batch.replay_ids.shape == (2, T)
        assert {tag for tag, _ in row_ids(batch.new_ids)} == {1}
        counts.update(tag for tag, _ in row_ids(batch.replay_ids))
        np.testing.assert_array_equal(batch.input_ids[:6], batch.new_ids)  # new rows first
    assert set(counts) == {2, 3}
    assert 0.12 < counts[2] / 400 < 0.22  # uniform over replay sequences: 10 of 60


def test_split_batch_size():
    assert split_batch_size(8, 0.25, has_replay=False) == (8, 0)
    assert split_batch_size(8, 0.0, has_replay=True) == (8, 0)
    assert split_batch_size(2, 0.9, has_replay=True) == (1, 1)  # at least one new row
    assert split_batch_size(32, 0.25, has_replay=True) == (24, 8)
    # on top: the whole batch stays new, and the replayed rows are still `ratio` of the larger one
    assert split_batch_size(32, 0.25, has_replay=True, on_top=True) == (32, 11)
    assert split_batch_size(16, 0.2, has_replay=True, on_top=True) == (16, 4)
    assert split_batch_size(2, 0.1, has_replay=True, on_top=True) == (2, 1)  # at least one replayed row
    assert split_batch_size(32, 0.25, has_replay=False, on_top=True) == (32, 0)
    assert split_batch_size(32, 0.0, has_replay=True, on_top=True) == (32, 0)


def test_same_seed_same_batches_and_state_resumes_exactly(ws):
    new, replay = shards(ws, {1: 9, 2: 20})
    a = BatchSampler([new], [replay], Draw(3, 2, seed=7))
    b = BatchSampler([new], [replay], Draw(3, 2, seed=7))
    first = [a.next_batch() for _ in range(10)]
    for _ in range(4):
        b.next_batch()
    resumed = BatchSampler([new], [replay], Draw(3, 2, seed=7))
    resumed.load_state_dict(b.state_dict())
    for batch in first[4:]:
        got = resumed.next_batch()
        np.testing.assert_array_equal(got.new_ids, batch.new_ids)
        np.testing.assert_array_equal(got.replay_ids, batch.replay_ids)
    other = BatchSampler([new], [replay], Draw(3, 2, seed=8))
    assert not np.array_equal(other.next_batch().input_ids, first[0].input_ids)


def test_ranks_take_disjoint_slices_of_the_same_global_batch(ws):
    new, replay = shards(ws, {1: 40, 2: 40})
    ranks = [BatchSampler([new], [replay], Draw(3, 1, seed=1), rank=r, world_size=2) for r in range(2)]
    whole = BatchSampler([new], [replay], Draw(3, 1, seed=1), world_size=2)
    for b in range(5):
        parts = [s.next_batch() for s in ranks]
        np.testing.assert_array_equal(np.concatenate([p.new_ids for p in parts]),
                                      whole.new_pool.gather(whole.new_indices(b), T))
        np.testing.assert_array_equal(np.concatenate([p.replay_ids for p in parts]),
                                      whole.replay_pool.gather(whole.replay_indices(b), T))
        assert not set(row_ids(parts[0].new_ids)) & set(row_ids(parts[1].new_ids))


def test_data_sample_trains_on_k_seeded_sequences_only(ws):
    (new,) = shards(ws, {1: 50})
    sampler = BatchSampler([new], [], Draw(4, seed=2, sample=10))
    assert sampler.n_new_sequences == 10
    seen = {rid for _ in range(10) for rid in row_ids(sampler.next_batch().new_ids)}
    assert len(seen) == 10
    again = BatchSampler([new], [], Draw(4, seed=2, sample=10))
    assert {rid for _ in range(10) for rid in row_ids(again.next_batch().new_ids)} == seen


def test_mixed_sequence_lengths_are_refused(ws):
    (a,) = shards(ws, {1: 5})
    inc = write_increment(ws, "long", tagged_rows(2, 5, 2 * T), tagged_rows(3, 1, 2 * T))
    with pytest.raises(InputError, match="different sequence lengths"):
        BatchSampler([a], [open_increment(ws, inc)], Draw(2, 1, seed=0))


def test_no_training_rows_is_an_input_error(ws):
    inc = write_increment(ws, "empty", np.zeros((0, T), dtype=np.uint16), tagged_rows(1, 2, T))
    with pytest.raises(InputError, match="no training sequences"):
        BatchSampler([open_increment(ws, inc)], [], Draw(2, seed=0))


def test_a_batch_reads_only_the_increments_it_draws_from(ws):
    """Cost does not grow with history: 60 earlier increments, yet a batch with 2 replay rows reads
    at most 2 of them (index -> increment is a searchsorted over the cumulative sizes)."""
    (new,) = shards(ws, {1: 64})
    history = shards(ws, {tag: 4 for tag in range(2, 62)}, heldout=0)
    reads: Counter[str] = Counter()
    sampler = BatchSampler([new], history, Draw(6, 2, seed=0))
    files = sampler.replay_pool.files
    real = files.read

    def spy(paths, index, width, dtype):
        reads.update({path.parent.name for path in paths})  # the increments whose files this batch reads
        return real(paths, index, width, dtype)

    files.read = spy
    for _ in range(20):
        reads.clear()
        batch = sampler.next_batch()
        assert sum(reads.values()) <= 2
        assert len({tag for tag, _ in row_ids(batch.replay_ids)}) == len(reads)


def test_rows_are_read_from_the_files_as_the_arrays_hold_them(ws):
    """The sampler reads rows with pread (the history is never mapped into the process): the batches
    are the ones indexing the arrays gives, and a row past the end of a changed file is an error."""
    new, *history = shards(ws, {1: 40, 2: 30, 3: 1, 4: 50})
    assert new.train_file == ws.increment_dir(new.id) / "train.bin"
    in_memory = [dataclasses.replace(s, train=np.array(s.train), train_file=None) for s in [new, *history]]
    from_files = BatchSampler([new], history, Draw(5, 7, seed=3, split="increment"))
    from_arrays = BatchSampler(in_memory[:1], in_memory[1:], Draw(5, 7, seed=3, split="increment"))
    for _ in range(12):
        a, b = from_files.next_batch(), from_arrays.next_batch()
        assert np.array_equal(a.input_ids, b.input_ids)
    with open(history[0].train_file, "r+b") as f:
        f.truncate(T * 2 * 5)  # the file lost rows after it was verified
    with pytest.raises(IntegrityError, match="past the end"):
        for _ in range(20):
            from_files.next_batch()


# ----------------------------------------------------------------------------- replay.split


def _line_sizes(k: int) -> list[int]:
    """A line of k earlier increments whose nightly sizes vary 50x (a quiet night, a bulk import)."""
    rng = np.random.default_rng(k)
    return [int(v) for v in rng.choice([40, 200, 2000], size=k, p=[0.3, 0.5, 0.2])]


@pytest.mark.parametrize("k", [8, 100])
def test_replay_shares_by_increment_cover_every_earlier_increment_as_the_line_grows(k):
    sizes = _line_sizes(k)
    by_size, by_increment = replay_shares(sizes, "size"), replay_shares(sizes, "increment")
    assert by_size.sum() == pytest.approx(1.0) and by_increment.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(by_increment, 1.0 / k)  # every increment 1/K, whatever its size
    np.testing.assert_allclose(by_size, np.array(sizes) / sum(sizes))  # its share of the rows
    # a 40-row night next to 2,000-row imports: by size it fades (under a 10th of 1/K at K=100)
    smallest = int(np.argmin(sizes))
    assert by_size[smallest] < by_increment[smallest] / (2 if k == 8 else 10)


def test_replay_shares_skip_empty_increments_and_refuse_unknown_rules():
    np.testing.assert_allclose(replay_shares([0, 10, 30], "increment"), [0.0, 0.5, 0.5])
    np.testing.assert_allclose(replay_shares([0, 0], "size"), [0.0, 0.0])
    with pytest.raises(ValueError, match="replay.split"):
        replay_shares([1], "recency")


def test_split_by_increment_draws_each_earlier_increment_equally(ws):
    new, *replay = shards(ws, {1: 30, 2: 10, 3: 90})
    counts = {}
    for split in ("size", "increment"):
        sampler = BatchSampler([new], replay, Draw(4, 4, seed=0, split=split))
        drawn = Counter(tag for _ in range(300) for tag, _ in row_ids(sampler.next_batch().replay_ids))
        counts[split] = drawn[2] / 1200
        rows = {r for _ in range(50) for r in row_ids(sampler.next_batch().replay_ids)}
        assert {tag for tag, _ in rows} == {2, 3} and all(0 <= i < (10 if t == 2 else 90) for t, i in rows)
    assert 0.06 < counts["size"] < 0.14  # 10 of 100 rows
    assert 0.44 < counts["increment"] < 0.56  # 1 of 2 increments


def test_split_by_increment_is_seeded_and_resumes(ws):
    new, *replay = shards(ws, {1: 9, 2: 5, 3: 40})
    a = BatchSampler([new], replay, Draw(3, 3, seed=7, split="increment"))
    first = [a.next_batch().replay_ids for _ in range(6)]
    b = BatchSampler([new], replay, Draw(3, 3, seed=7, split="increment"))
    b.load_state_dict({"batch_index": 3})
    for expected in first[3:]:
        np.testing.assert_array_equal(b.next_batch().replay_ids, expected)


def test_a_plan_names_the_earlier_increments_replay_would_leave_uncovered():
    from incr_cli.training.plan import IncrementPlan

    plan = IncrementPlan("v0003", ["d0004-x"], ["d0001-a", "d0002-b", "d0003-c"], 40, 900, 8, 2, 1, 10, 0, T,
                         replay_rows={"d0001-a": 0.4, "d0002-b": 2.0, "d0003-c": 17.6})
    assert plan.uncovered == ["d0001-a"]
    plan.replay_per_batch = 0  # nothing replayed at all: nothing to warn about
    assert plan.uncovered == []


def test_the_recipe_offers_exactly_the_samplers_split_rules():

    from incr_cli.config.recipe import ReplayConfig
    from incr_cli.data.shards import REPLAY_SPLITS

    field = next(f for f in dataclasses.fields(ReplayConfig) if f.name == "split")
    assert field.metadata["choices"] == REPLAY_SPLITS and field.default in REPLAY_SPLITS
