"""TokenLoader: windows, rank split, accumulation equivalence, resume, eval pass, dtypes, errors."""

import json
import threading

import numpy as np
import pytest
import torch

from gptforge.data.loader import TokenLoader
from gptforge.data.prefetch import Prefetcher
from gptforge.errors import UserError

T = 8


def make_dir(tmp_path, n_train=T * 100 + 1, n_val=T * 10 + 1, dtype="uint16", offset=0):
    """A prepared dir whose token at position i is offset+i, so a window's first token names it."""
    d = tmp_path / f"data_{dtype}_{n_train}"
    d.mkdir()
    for split, n in (("train", n_train), ("val", n_val)):
        (np.arange(n, dtype=np.int64) + offset).astype(np.dtype(dtype).newbyteorder("<")).tofile(d / f"{split}.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": dtype, "vocab_size": offset + n_train, "kind": "bpe",
                                             "splits": {"train": n_train, "val": n_val}, "eos_id": 0}))
    return d


def windows(batch, offset=0):
    """Window index of each row (token values are positions)."""
    return [(int(x) - offset) // T for x in batch["input_ids"][:, 0]]


def test_windows_and_labels(tmp_path):
    d = make_dir(tmp_path)
    ld = TokenLoader(d, "train", micro_batch=4, block_size=T, seed=3)
    assert ld.windows_per_epoch == 100  # 100 windows, 4 | 100
    b = ld.next_batch()
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (4, T) == b["labels"].shape
    for x, y, w in zip(b["input_ids"], b["labels"], windows(b)):
        assert x.tolist() == list(range(w * T, w * T + T)) and y.tolist() == list(range(w * T + 1, w * T + T + 1))


def test_epoch_is_a_permutation_and_next_epoch_differs(tmp_path):
    d = make_dir(tmp_path, n_train=T * 10 + 1)
    ld = TokenLoader(d, "train", micro_batch=3, block_size=T, seed=0)  # 10 windows, 9 usable per epoch
    e0 = [w for _ in range(3) for w in windows(ld.next_batch())]
    e1 = [w for _ in range(3) for w in windows(ld.next_batch())]
    assert ld.epoch == 1 and len(set(e0)) == 9 and len(set(e1)) == 9 and set(e0) <= set(range(10))
    assert e0 != e1 and e0 != sorted(e0)
    # the same seed and epoch give the same order in a fresh loader
    again = TokenLoader(d, "train", micro_batch=3, block_size=T, seed=0)
    assert [w for _ in range(3) for w in windows(again.next_batch())] == e0


def test_ranks_partition_the_global_batch_exactly(tmp_path):
    d = make_dir(tmp_path)
    single = TokenLoader(d, "train", micro_batch=8, block_size=T, seed=1)
    ranks = [TokenLoader(d, "train", micro_batch=4, block_size=T, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    accum = TokenLoader(d, "train", micro_batch=2, block_size=T, seed=1, accum_steps=4)
    seen = []
    for step in range(30):  # 30 steps of 8 windows cross 2 epoch boundaries (96 usable windows per epoch)
        one = single.next_batch()
        two = [ld.next_batch() for ld in ranks]
        acc = [accum.next_batch() for _ in range(4)]
        assert torch.equal(one["input_ids"], torch.cat([b["input_ids"] for b in two]))
        assert torch.equal(one["labels"], torch.cat([b["labels"] for b in acc]))
        seen.append(windows(one))
    assert single.epoch == ranks[0].epoch == accum.epoch == 2
    first_epoch = [w for s in seen[:12] for w in s]  # 12 steps * 8 = 96 windows: no overlap, no gap
    assert len(first_epoch) == len(set(first_epoch)) == 96


def test_resume_across_dp_sizes(tmp_path):
    d = make_dir(tmp_path)
    ref = TokenLoader(d, "train", micro_batch=8, block_size=T, seed=7)
    expected = [ref.next_batch()["input_ids"] for _ in range(20)]
    two = [TokenLoader(d, "train", micro_batch=4, block_size=T, seed=7, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(13):
        for ld in two:
            ld.next_batch()
    state = json.loads(json.dumps(two[0].state_dict()))  # plain ints, JSON round trip
    assert state == {"epoch": 1, "pos": 8, "seed": 7} == two[1].state_dict()
    four = [TokenLoader(d, "train", micro_batch=2, block_size=T, seed=0, dp_rank=r, dp_size=4) for r in range(4)]
    for ld in four:
        ld.load_state_dict(state)
    for want in expected[13:]:
        assert torch.equal(want, torch.cat([ld.next_batch()["input_ids"] for ld in four]))
    with pytest.raises(UserError, match="not a multiple of the global batch"):
        TokenLoader(d, "train", micro_batch=3, block_size=T).load_state_dict({"epoch": 0, "pos": 8, "seed": 0})


def test_iter_eval_in_order_and_disjoint(tmp_path):
    d = make_dir(tmp_path, n_val=T * 10 + 5)  # 10 val windows
    ranks = [TokenLoader(d, "val", micro_batch=2, block_size=T, dp_rank=r, dp_size=2, shuffle=False) for r in range(2)]
    got = [[windows(b) for b in ld.iter_eval()] for ld in ranks]
    assert got == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]  # tail (8, 9) < global batch: dropped
    assert [windows(b) for b in ranks[0].iter_eval(max_batches=1)] == [[0, 1]]
    assert ranks[0].state_dict()["pos"] == 0  # eval does not move the cursor
    big = TokenLoader(d, "val", micro_batch=16, block_size=T, dp_rank=1, dp_size=3, shuffle=False)
    assert [windows(b) for b in big.iter_eval()] == [[3, 4, 5]]  # too few for one batch: 10 // 3 each
    assert windows(ranks[1].next_batch()) == [2, 3]  # unshuffled next_batch runs in order too


def test_uint32_tokens(tmp_path):
    off = 70_000  # ids above uint16
    d = make_dir(tmp_path, dtype="uint32", offset=off)
    b = TokenLoader(d, "train", micro_batch=2, block_size=T, shuffle=False).next_batch()
    assert b["input_ids"][0].tolist() == list(range(off, off + T)) and b["labels"][1, -1].item() == off + 2 * T


def test_errors(tmp_path):
    d = make_dir(tmp_path, n_train=T * 3 + 1, n_val=T)
    with pytest.raises(UserError, match=r"val.bin has 8 tokens, fewer than block_size\+1 = 9"):
        TokenLoader(d, "val", micro_batch=1, block_size=T)
    with pytest.raises(UserError, match="fewer than one global step needs"):
        TokenLoader(d, "train", micro_batch=2, block_size=T, dp_size=2).next_batch()
    with pytest.raises(UserError, match="no meta.json"):
        TokenLoader(tmp_path, "train", micro_batch=1, block_size=T)
    with pytest.raises(UserError, match="missing .*test.bin"):
        TokenLoader(d, "test", micro_batch=1, block_size=T)
    with pytest.raises(UserError, match="dp_rank 2 is outside"):
        TokenLoader(d, "train", micro_batch=1, block_size=T, dp_rank=2, dp_size=2)


def test_on_prepared_data(tmp_path):
    from gptforge.data.prepare import prepare

    (tmp_path / "t.txt").write_text("abcdefgh" * 200)
    prepare(str(tmp_path / "t.txt"), tmp_path / "out", "char", progress=False)
    ld = TokenLoader(tmp_path / "out", "train", micro_batch=4, block_size=16)
    b = ld.next_batch()
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1]) and b["input_ids"].max() < 13


# ---- Prefetcher: the background thread -------------------------------------------------------------------
def _filled(pf, depth):
    """Wait (bounded) until the thread has `depth` batches ready, i.e. the wrapped loader is ahead."""
    for _ in range(2000):
        if pf._queue is not None and pf._queue.qsize() == depth:
            return True
        threading.Event().wait(0.005)
    return False


def test_prefetch_same_batches_and_state_counts_consumed_only(tmp_path):
    d = make_dir(tmp_path)
    plain = TokenLoader(d, "train", micro_batch=4, block_size=T, seed=5)
    pf = Prefetcher(TokenLoader(d, "train", micro_batch=4, block_size=T, seed=5), torch.device("cpu"), depth=3)
    with pf:
        for _ in range(30):  # 120 windows: across the epoch boundary (100 per epoch)
            assert torch.equal(pf.next_batch()["input_ids"], plain.next_batch()["input_ids"])
        assert _filled(pf, 3)  # three more batches queued (a fourth may wait to be): the loader is ahead ...
        ahead = pf.loader.state_dict()
        assert ahead["epoch"] == 1 and ahead["pos"] in (32, 36)
        saved = json.loads(json.dumps(pf.state_dict()))  # ... the state saved in a checkpoint is not
        assert saved == plain.state_dict() == {"epoch": 1, "pos": 20, "seed": 5}
        assert pf.batches == 30 and pf.wait_s > 0 and pf.take_wait_s() > 0 and pf.wait_s == 0
    assert pf._thread is None and not any(t.name == "gptforge-prefetch" for t in threading.enumerate())
    # after close() the loader is rewound: the next batch is the one after the last handed out
    expected = plain.next_batch()["input_ids"]
    assert torch.equal(pf.next_batch()["input_ids"], expected)
    pf.close()
    # a resume from the saved state in a fresh prefetcher continues exactly
    resumed = Prefetcher(TokenLoader(d, "train", micro_batch=4, block_size=T, seed=5), torch.device("cpu"), depth=2)
    resumed.next_batch()  # the thread is running and ahead: load_state_dict must drop what it prepared
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.next_batch()["input_ids"], expected)
    assert torch.equal(resumed.next_batch()["input_ids"], plain.next_batch()["input_ids"])
    resumed.close()


def test_prefetch_depth0_and_errors_reach_the_caller(tmp_path):
    d = make_dir(tmp_path, n_train=T * 3 + 1)
    sync = Prefetcher(TokenLoader(d, "train", micro_batch=1, block_size=T, seed=2), torch.device("cpu"), depth=0)
    ref = TokenLoader(d, "train", micro_batch=1, block_size=T, seed=2)
    assert [windows(sync.next_batch()) for _ in range(4)] == [windows(ref.next_batch()) for _ in range(4)]
    assert sync.state_dict() == ref.state_dict() and sync._thread is None and sync.windows_per_epoch == 3
    # a loader error raised in the thread comes out of next_batch() as it is, and the thread is gone
    bad = Prefetcher(TokenLoader(d, "train", micro_batch=2, block_size=T, dp_size=2), torch.device("cpu"))
    with pytest.raises(UserError, match="fewer than one global step needs"):
        bad.next_batch()
    assert bad._thread is None
