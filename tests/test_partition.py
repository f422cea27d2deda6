import pytest

from pipelining_seq import balanced_partition, chunk_cost, uniform_partition
from pipelining_seq.partition import resolve_partition

DIMS_7B = dict(num_layers=32, hidden_size=4096, num_heads=32, ffn_hidden_size=16384, vocab_size=51200)


def costs(parts, dims):
    ends = [sum(parts[: i + 1]) for i in range(len(parts))]
    return [chunk_cost(s, e, **dims) for s, e in zip(parts, ends)]


def test_balanced_7b_32k_matches_paper():
    parts = balanced_partition(32768, 4, **DIMS_7B)
    assert sum(parts) == 32768
    for got, want in zip(parts, [11024, 8416, 7088, 6240]):
        assert abs(got - want) / want < 0.01
    c = costs(parts, DIMS_7B)
    assert max(c) / min(c) < 1.01


@pytest.mark.parametrize(
    "dims,seq,want",
    [
        (dict(num_layers=32, hidden_size=4096, num_heads=32), 65536, [25024, 16272, 13040, 11200]),
        (dict(num_layers=64, hidden_size=6144, num_heads=64), 65536, [23424, 16624, 13640, 11848]),
        (dict(num_layers=32, hidden_size=2560, num_heads=32), 32768, [11952, 8264, 6728, 5824]),
    ],
)
def test_balanced_other_models(dims, seq, want):
    dims = dict(dims, ffn_hidden_size=4 * dims["hidden_size"], vocab_size=51200)
    parts = balanced_partition(seq, 4, **dims)
    assert all(abs(g - w) / w < 0.01 for g, w in zip(parts, want))


def test_balanced_multiple_of_and_equal_costs_without_attention_growth():
    parts = balanced_partition(32768, 4, **DIMS_7B, multiple_of=128)
    assert sum(parts) == 32768 and all(p % 128 == 0 and p > 0 for p in parts)
    # Later chunks are shorter: causal attention makes them dearer per token.
    assert parts == sorted(parts, reverse=True)


def test_balanced_k1_and_small_sequences():
    assert balanced_partition(100, 1, **DIMS_7B) == [100]
    parts = balanced_partition(16, 8, **DIMS_7B)
    assert sum(parts) == 16 and min(parts) >= 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seq_len=100, n_chunks=4, multiple_of=128), "not a multiple of multiple_of"),
        (dict(seq_len=8, n_chunks=16), "lower n_seq_chunks"),
        (dict(seq_len=8, n_chunks=0), "at least 1"),
    ],
)
def test_balanced_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        balanced_partition(**kwargs, **DIMS_7B)


def test_uniform_error_suggests_lengths():
    with pytest.raises(ValueError, match=r"divisible.*such as 12 or 16"):
        uniform_partition(14, 4)
    assert uniform_partition(16, 4) == [4, 4, 4, 4]


@pytest.mark.parametrize(
    "partition,match",
    [
        ([4, 4, 4], "sums to 12"),
        ([8, 0, 8], "positive integer"),
        ([8, 8], "n_seq_chunks=3"),
        ("balanced", "use 'uniform'"),
    ],
)
def test_resolve_partition_errors(partition, match):
    with pytest.raises(ValueError, match=match):
        resolve_partition(partition, 16, 3)


def test_resolve_partition_callable():
    assert resolve_partition(lambda s: [s - 3, 3], 16, 2) == [13, 3]
