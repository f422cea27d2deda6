import pytest
import torch

from pipelining_seq import balanced_partition, chunk_cost, uniform_partition
from pipelining_seq.flops import FlopModel
from pipelining_seq.models import GPT, GPTConfig
from pipelining_seq.models.gpt import balanced_partition_for, flop_model
from pipelining_seq.partition import resolve_partition
from pipelining_seq.trainer.metrics import model_flops_per_token

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
        ("balanced", "needs flop_model"),
        ("calibrated", "needs calibrated"),
        ("zigzag", "use one of uniform, balanced, calibrated"),
    ],
)
def test_resolve_partition_errors(partition, match):
    with pytest.raises(ValueError, match=match):
        resolve_partition(partition, 16, 3)


def test_resolve_partition_callable():
    assert resolve_partition(lambda s: [s - 3, 3], 16, 2) == [13, 3]


# ------------------------------------------------------------------------ FLOP model
LLAMA_LIKE = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
                  vocab_size=128256, mlp="swiglu")


@pytest.mark.parametrize("seq,k,mult", [(32768, 4, 1), (65536, 8, 1), (131072, 4, 1), (32768, 4, 64)])
def test_balanced_swiglu_gqa_equalises_that_models_cost(seq, k, mult):
    parts = balanced_partition(seq, k, **LLAMA_LIKE, multiple_of=mult)
    assert sum(parts) == seq and all(p % mult == 0 for p in parts)
    c = costs(parts, LLAMA_LIKE)
    # Within 0.1%; rounding down to multiple_of moves up to (k-1)*multiple_of tokens to the first chunk.
    assert max(c) / min(c) - 1 < 1e-3 + (k - 1) * mult * 2 / min(parts)
    # The paper's MHA/GELU model would cut this model's chunks differently (and unequally for it).
    mha = balanced_partition(seq, k, **dict(LLAMA_LIKE, num_kv_heads=None, mlp="gelu"), multiple_of=mult)
    assert mha != parts
    c_mha = costs(mha, LLAMA_LIKE)
    assert max(c_mha) / min(c_mha) > max(c) / min(c)


@pytest.mark.parametrize(
    "over",
    [dict(), dict(n_kv_heads=2), dict(mlp="swiglu"), dict(mlp="swiglu", n_kv_heads=1, ffn_dim=200)],
)
def test_flop_model_counts_every_matmul_of_the_gpt(over):
    """β is 2 FLOPs per weight of a block's linear layers; the head 2 per output weight."""
    cfg = GPTConfig(vocab_size=96, n_layers=3, dim=64, n_heads=8, **over)
    gpt = GPT(cfg)
    block = gpt.layers["0"]
    weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    fm = flop_model(cfg)
    assert fm.token_flops == 2 * weights
    assert fm.head_cost(5) == 2 * 5 * gpt.output.weight.numel()
    # QK^T and AV per pair and head (2*d each) plus 3 for the softmax, whatever the kv heads.
    assert fm.pair_flops == (4 * cfg.head_dim + 3) * cfg.n_heads
    # MFU's per-token figure is the same model.
    assert model_flops_per_token(cfg, seq_len=40) == pytest.approx(3 * fm.chunk_cost(40, 40) / 40)


def test_flop_model_mla_head_sizes():
    # MLA-style: query/key heads of 192 (128 + 64 RoPE), value heads of 128, 16 heads over H=2048.
    fm = FlopModel(num_layers=2, hidden_size=2048, num_heads=16, ffn_hidden_size=1408, vocab_size=1000,
                   mlp="swiglu", head_dim=192, v_head_dim=128)
    h, a, dq, dv, f = 2048, 16, 192, 128, 1408
    assert fm.num_kv_heads == 16
    assert fm.pair_flops == (2 * dq + 2 * dv + 3) * a
    assert fm.token_flops == 2 * h * a * (dq + dq + dv) + 2 * a * dv * h + 3 * 2 * h * f
    assert chunk_cost(10, 30, **fm.partition_kwargs()) == pytest.approx(
        4 * 10 * h * 1000 + 2 * (fm.pair_flops * (10 * 30 - 50) + fm.token_flops * 10))
    parts = balanced_partition(32768, 4, **fm.partition_kwargs())
    c = [fm.chunk_cost(s, e) for s, e in zip(parts, [sum(parts[: j + 1]) for j in range(4)])]
    assert max(c) / min(c) - 1 < 1e-3


def test_flop_model_stage_costs_split_layers_like_the_model():
    fm = FlopModel(**DIMS_7B)
    lengths = [11024, 8416, 7088, 6240]
    rows = fm.stage_costs(lengths, 3)  # 32 layers over 3 stages: 11, 11, 10
    ends = [sum(lengths[: j + 1]) for j in range(4)]
    for st, n in enumerate((11, 11, 10)):
        for j, (s, e) in enumerate(zip(lengths, ends)):
            head = fm.head_cost(s) if st == 2 else 0.0
            assert rows[st][j] == pytest.approx(n * fm.layer_cost(s, e) + head)
    # Whole model = stages + the embedding the paper counts (2sHV).
    total = sum(sum(r[j] for r in rows) for j in range(4))
    assert total + 2 * 32768 * 4096 * 51200 == pytest.approx(sum(costs(lengths, DIMS_7B)))


def test_balanced_partition_for_a_gpt_config_and_bad_dims():
    cfg = GPTConfig(vocab_size=256, n_layers=4, dim=64, n_heads=4, n_kv_heads=2, mlp="swiglu")
    assert balanced_partition_for(cfg, 512, 4, multiple_of=8) == balanced_partition(
        512, 4, num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=cfg.ffn_dim,
        vocab_size=256, mlp="swiglu", multiple_of=8)
    with pytest.raises(ValueError, match="mlp='relu'"):
        balanced_partition(64, 2, **dict(DIMS_7B, mlp="relu"))
    with pytest.raises(ValueError, match="not divisible by num_heads=3.*head_dim"):
        chunk_cost(8, 8, **dict(DIMS_7B, num_heads=3))
    with pytest.raises(ValueError, match="num_layers=0"):
        balanced_partition(64, 2, **dict(DIMS_7B, num_layers=0))


def test_resolve_partition_by_name_in_one_place():
    from pipelining_seq.flops import FlopModel

    fm = FlopModel(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=256, vocab_size=100)
    assert resolve_partition("Balanced", 64, 4, flop_model=fm, multiple_of=8) == fm.balanced_partition(
        64, 4, multiple_of=8
    )
    assert resolve_partition("calibrated", 16, 2, calibrated={2: [10, 6]}) == [10, 6]
    with pytest.raises(ValueError, match="no calibrated lengths for n_seq_chunks=3"):
        resolve_partition("calibrated", 16, 3, calibrated={2: [10, 6]})
    assert resolve_partition("calibrated", 64, 4, calibrated=fm, multiple_of=8) == fm.balanced_partition(
        64, 4, multiple_of=8
    )


def test_chunking_config_and_keywords_are_one_setting():
    from pipelining_seq import ChunkingConfig
    from pipelining_seq.chunking import chunking_from
    from pipelining_seq.flops import FlopModel

    cfg = ChunkingConfig(n_seq_chunks=2, seq_partition=[5, 3])
    assert cfg.static_seq_len == 8 and cfg.lengths(8) == [5, 3]
    assert chunking_from("S", None, n_seq_chunks=2, seq_partition=[5, 3]) == cfg
    assert chunking_from("S", cfg, n_seq_chunks=None, seq_dim=1) is cfg
    with pytest.raises(ValueError, match="seq_dim given next to chunking="):
        chunking_from("S", cfg, seq_dim=2)
    with pytest.raises(TypeError, match="pass n_seq_chunks"):
        chunking_from("S", None, n_seq_chunks=None)
    with pytest.raises(ValueError, match="S: n_seq_chunks=0 must be a positive integer"):
        chunking_from("S", None, n_seq_chunks=0)
    with pytest.raises(ValueError, match="needs the FLOP model"):
        ChunkingConfig(n_seq_chunks=2, seq_partition="balanced")
    fm = FlopModel(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=256, vocab_size=100)
    balanced = ChunkingConfig(n_seq_chunks=4, seq_partition="balanced", flop_model=fm, multiple_of=8)
    assert balanced.lengths(64) == fm.balanced_partition(64, 4, multiple_of=8)
