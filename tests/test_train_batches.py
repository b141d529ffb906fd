"""Training's batches and step: vectorised collation, packed rows (same loss as padded ones), the targets-only
loss, the fused GELU, the prefetch thread and the step walk. Fast: tiny models, no training runs."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dialogpt_zh.data.store import TokenStore
from dialogpt_zh.sequence import Layout
from dialogpt_zh.training.batches import (
    IGNORE_INDEX,
    collate,
    collate_rows,
    plan_batches,
    plan_packed_batches,
    window_sequences,
)
from dialogpt_zh.training.objective import NextTokenLoss, fast_activations
from dialogpt_zh.training.prefetch import Position, Prefetcher, step_batches
from dialogpt_zh.training.presets import build_model


@pytest.fixture(scope="module")
def split(fixture_store):
    return TokenStore(fixture_store).split("train")


@pytest.fixture(scope="module")
def tiny_lm(fixture_tokenizer):
    torch.manual_seed(0)
    return build_model("tiny", fixture_tokenizer, dropout=0.0).eval()


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_vectorised_sequences_are_the_sequence_format(split, direction):
    windows = np.arange(len(split))
    tokens, lengths, first = window_sequences(split, windows, direction)
    starts = np.cumsum(lengths) - lengths
    for i in windows:
        assert tokens[starts[i]:starts[i] + lengths[i]].tolist() == split.sequence(int(i), direction)
        assert first[i] == split.first_turn_length(int(i), direction)
    assert lengths.tolist() == split.lengths().tolist()


def test_packed_plan_covers_every_window_once_in_full_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=3000)
    plan = plan_packed_batches(lengths, row_tokens=256, batch_tokens=1024, seed=1, epoch=0)
    rows = [r for batch in plan for r in batch]
    flat = np.concatenate(rows)
    assert sorted(flat.tolist()) == list(range(3000))
    assert all(lengths[r].sum() <= 256 for r in rows)
    assert all(len(b) == 4 for b in plan[:-1]) and 1 <= len(plan[-1]) <= 4
    assert lengths.sum() / (len(rows) * 256) > 0.97  # best-fit leaves little room unused
    again = plan_packed_batches(lengths, 256, 1024, seed=1, epoch=0)
    assert [[r.tolist() for r in b] for b in plan] == [[r.tolist() for r in b] for b in again]
    other = plan_packed_batches(lengths, 256, 1024, seed=1, epoch=1)
    assert [[r.tolist() for r in b] for b in plan] != [[r.tolist() for r in b] for b in other]


def _hf_loss(lm, split, windows, direction, replies_only=False) -> float:
    """The reference: each window alone through the plain Hugging Face model, summed over its targets."""
    total = 0.0
    with torch.no_grad():
        for i in windows:
            ids = torch.tensor([split.sequence(int(i), direction)])
            labels = ids.clone()
            labels[0, :split.first_turn_length(int(i), direction) if replies_only else 1] = IGNORE_INDEX
            logits = lm(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, labels[0, 1:], reduction="sum"))
    return total


@pytest.mark.parametrize("direction,replies_only", [("forward", False), ("backward", False), ("forward", True)])
def test_packed_and_padded_batches_give_the_same_loss(split, tiny_lm, direction, replies_only):
    lengths = split.lengths()
    rows = plan_packed_batches(lengths, row_tokens=96, batch_tokens=96 * 6, seed=0, epoch=0)[0]
    assert any(len(r) > 2 for r in rows)  # really packed
    windows = [int(w) for r in rows for w in r]
    packed = collate_rows(split, rows, direction, 0, replies_only, packed=True)
    padded = collate(split, windows, direction, 0, replies_only)
    assert packed.num_targets == padded.num_targets and packed.num_tokens == padded.num_tokens
    assert packed.input_ids.shape[0] == len(rows) < padded.input_ids.shape[0]
    loss = NextTokenLoss(tiny_lm)
    with torch.no_grad():
        a = float(loss(packed.input_ids, packed.target_index, packed.target_ids, packed.position_ids))
        b = float(loss(padded.input_ids, padded.target_index, padded.target_ids, padded.position_ids))
    reference = _hf_loss(tiny_lm, split, windows, direction, replies_only)
    assert a == pytest.approx(reference, rel=1e-5) and b == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_cdial_layout_batches_give_the_per_window_loss_with_token_types(split, tiny_lm, fixture_tokenizer, packed):
    """A layout with token types (cdial: speaker tokens) goes through the same rows: ids and types are what
    `Layout.sequence` builds for each window, and the loss equals each window alone with its token types."""
    vocab = fixture_tokenizer.get_vocab()
    speakers = (vocab["你"], vocab["我"])  # any two ids stand in for [speaker1]/[speaker2]
    layout = Layout("cdial", fixture_tokenizer.cls_token_id, fixture_tokenizer.sep_token_id, speakers)
    rows = plan_packed_batches(split.lengths(layout.extra_tokens), row_tokens=96, batch_tokens=96 * 4, seed=0,
                               epoch=0)[0]
    windows = [int(w) for r in rows for w in r]
    batch = (collate_rows(split, rows, "backward", 0, True, packed=True, layout=layout) if packed
             else collate(split, windows, "backward", 0, True, layout))
    reference, targets, col = 0.0, 0, 0
    with torch.no_grad():
        for k, w in enumerate(windows):
            turns = split.turns(w)
            ids, types = layout.sequence(turns, "backward")
            row = rows_of(rows, k) if packed else k
            if packed and row != rows_of(rows, k - 1):
                col = 0
            start = col if packed else 0
            assert batch.input_ids[row, start:start + len(ids)].tolist() == ids
            assert batch.token_type_ids[row, start:start + len(ids)].tolist() == types
            col = start + len(ids)
            logits = tiny_lm(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0, :-1]
            labels = torch.tensor(ids[1:])
            labels[:layout.first_turn_length(turns, "backward") - 1] = IGNORE_INDEX
            reference += float(F.cross_entropy(logits, labels, reduction="sum"))
            targets += int((labels != IGNORE_INDEX).sum())
        loss = float(NextTokenLoss(tiny_lm)(batch.input_ids, batch.target_index, batch.target_ids,
                                            batch.position_ids, batch.token_type_ids))
    assert batch.num_targets == targets
    assert loss == pytest.approx(reference, rel=1e-5)


def rows_of(rows, k: int) -> int:
    """The row that holds the k-th window of a packed batch (laid out row by row)."""
    if k < 0:
        return -1
    ends = np.cumsum([len(r) for r in rows])
    return int(np.searchsorted(ends, k, side="right"))


def test_a_packed_window_sees_only_itself(split, tiny_lm):
    """Change every token of one window of a packed row: the loss of the others in the row stays the same."""
    rows = plan_packed_batches(split.lengths(), row_tokens=96, batch_tokens=96, seed=0, epoch=0)
    row = next(r for b in rows for r in b if len(r) >= 3)
    batch = collate_rows(split, [row], "forward", 0, packed=True)
    first_len = len(split.sequence(int(row[0]), "forward"))
    assert batch.position_ids[0, :first_len].tolist() == list(range(first_len))
    assert batch.position_ids[0, first_len] == 0  # the next window starts again
    body = tiny_lm.transformer
    with torch.no_grad():  # as NextTokenLoss calls it (with a cache, transformers would not build the packed mask)
        logits = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
        changed = batch.input_ids.clone()
        changed[0, 1:first_len - 1] = (changed[0, 1:first_len - 1] + 7) % tiny_lm.config.vocab_size
        logits2 = body(input_ids=changed, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    assert not torch.allclose(logits[0, :first_len], logits2[0, :first_len])
    assert torch.allclose(logits[0, first_len:], logits2[0, first_len:], atol=1e-6)


def test_fast_activations_keep_the_function_and_the_checkpoint(split, fixture_tokenizer):
    torch.manual_seed(1)
    lm = build_model("tiny", fixture_tokenizer, dropout=0.0).eval()
    batch = collate(split, np.arange(12), "forward", 0)
    loss = NextTokenLoss(lm)
    with torch.no_grad():
        before = float(loss(batch.input_ids, batch.target_index, batch.target_ids))
        weights = {k: v.clone() for k, v in lm.state_dict().items()}
        assert fast_activations(lm) == lm.config.n_layer
        after = float(loss(batch.input_ids, batch.target_index, batch.target_ids))
    assert after == pytest.approx(before, rel=1e-6)
    assert lm.config.activation_function == "gelu_new"  # what is saved is unchanged
    assert all(torch.equal(weights[k], v) for k, v in lm.state_dict().items())
    assert fast_activations(lm) == 0


@pytest.mark.parametrize("packed", [False, True])
def test_targets_are_the_next_tokens_inside_each_row(split, packed):
    rows = [[0, 3], [7], [1, 2, 4]] if packed else [[0], [7], [11]]
    batch = collate_rows(split, rows, "backward", 0, replies_only=True, packed=packed)
    width = batch.input_ids.shape[1]
    expected = [(r * width + t, int(batch.labels[r, t + 1])) for r in range(len(rows)) for t in range(width - 1)
                if batch.labels[r, t + 1] != IGNORE_INDEX]
    assert list(zip(batch.target_index.tolist(), batch.target_ids.tolist())) == expected
    assert batch.num_targets == len(expected) > 0


def test_fused_head_gives_the_loss_and_gradients_of_the_plain_one(split, fixture_tokenizer):
    torch.manual_seed(2)
    lm = build_model("tiny", fixture_tokenizer, dropout=0.0).train()
    plain, fused = NextTokenLoss(lm), NextTokenLoss(lm, fused_head=True)
    batches = [collate(split, np.arange(k, k + 6), "forward", 0) for k in (0, 10, 20)]

    def run(loss_model, batch):
        lm.zero_grad(set_to_none=True)
        loss = loss_model(batch.input_ids, batch.target_index, batch.target_ids)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in lm.named_parameters()}

    for batch in batches:  # batches of different sizes: the buffer grows and is reused
        (a, grads_a), (b, grads_b) = run(plain, batch), run(fused, batch)
        assert b == pytest.approx(a, rel=1e-6)
        for name in grads_a:  # the tied embedding / head weight included
            gap = float((grads_a[name] - grads_b[name]).abs().max())
            assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5), (name, gap)
    # two forwards before their backwards (the second took the buffer): the first one's gradients still hold
    lm.zero_grad(set_to_none=True)
    first = fused(batches[0].input_ids, batches[0].target_index, batches[0].target_ids)
    fused(batches[1].input_ids, batches[1].target_index, batches[1].target_ids)
    first.backward()
    _, expected = run(plain, batches[0])
    lm.zero_grad(set_to_none=True)
    first = fused(batches[0].input_ids, batches[0].target_index, batches[0].target_ids)
    fused(batches[1].input_ids, batches[1].target_index, batches[1].target_ids)
    first.backward()
    assert all(torch.allclose(expected[n], p.grad, rtol=1e-4, atol=1e-5) for n, p in lm.named_parameters())
    reference = run(plain, batches[2])[0]
    with torch.no_grad():  # validation takes the plain path
        assert float(fused(batches[2].input_ids, batches[2].target_index, batches[2].target_ids)) == \
            pytest.approx(reference, rel=1e-6)


def test_padding_gets_no_loss_and_changes_nothing(split, tiny_lm):
    batch = collate(split, [0, 5, 9], "forward", 0)
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
    noisy = batch.input_ids.clone()
    noisy[batch.attention_mask == 0] = 3  # whatever sits in the padding
    loss = NextTokenLoss(tiny_lm)
    with torch.no_grad():
        a = loss(batch.input_ids, batch.target_index, batch.target_ids)
        b = loss(noisy, batch.target_index, batch.target_ids)
    assert torch.equal(a, b)


def test_step_walk_runs_across_epochs_and_ends_with_the_last():
    plans = {e: [f"e{e}b{i}" for i in range(3)] for e in range(3)}
    walk = list(step_batches(plans.__getitem__, 0, 1, grad_accum=2, last_epoch=1))
    assert [m for m, _ in walk] == [["e0b1", "e0b2"], ["e1b0", "e1b1"], ["e1b2"]]
    assert [p for _, p in walk] == [Position(0, 3, 3), Position(1, 2, 3), Position(1, 3, 3)]
    endless = step_batches(plans.__getitem__, 2, 2, grad_accum=1, last_epoch=None)
    plans[3] = ["e3b0"]
    assert [next(endless)[0] for _ in range(2)] == [["e2b2"], ["e3b0"]]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_keeps_the_order_and_reports_errors_where_they_happen(depth):
    def source():
        yield from range(5)
        raise ValueError("bad plan")

    seen_threads = set()

    def make(x):
        seen_threads.add(threading.current_thread().name)
        return x * 10

    with Prefetcher(source(), make, depth) as items:
        got = [next(items) for _ in range(5)]
        with pytest.raises(ValueError, match="bad plan"):
            next(items)
        with pytest.raises(ValueError, match="bad plan"):  # stays failed; never blocks
            next(items)
    assert got == [0, 10, 20, 30, 40]
    assert seen_threads == ({"MainThread"} if depth == 0 else {"batch-prefetch"})
    with Prefetcher(iter(range(3)), make, depth) as items:
        assert list(items) == [0, 10, 20]


def test_prefetcher_stops_its_thread_when_left_early():
    with Prefetcher(iter(range(10 ** 6)), lambda x: x, depth=2) as items:
        assert next(items) == 0
        thread = items._thread
    assert thread is not None and not thread.is_alive()


def test_batch_moves_with_non_blocking_copies(split):
    batch = collate(split, [1, 2], "backward", 0)
    moved = batch.to("cpu", non_blocking=True)
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.position_ids is None
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.input_ids.is_pinned() and pinned.target_ids.is_pinned()


def test_padded_plans_still_group_by_length():
    lengths = np.random.default_rng(3).integers(5, 200, size=500)
    plan = plan_batches(lengths, 1024, 0, seed=0, epoch=0)
    assert sorted(np.concatenate(plan).tolist()) == list(range(500))


def test_glibc_malloc_is_asked_to_keep_freed_memory():
    import ctypes
    import ctypes.util

    from dialogpt_zh.training.setup import keep_freed_memory

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError, TypeError):
        pytest.skip("not glibc: nothing to tune")
    assert keep_freed_memory() is True
