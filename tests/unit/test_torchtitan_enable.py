"""enable() on torchtitan configs, in process: wiring, command-line parsing, and start-up errors.

No process group is needed: everything here happens before the Trainer is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("torchtitan", reason="torchtitan is not installed in this interpreter")

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss  # noqa: E402
from torchtitan.models.common.attention import BaseAttention, ScaledDotProductAttention  # noqa: E402
from torchtitan.protocols.module import Module  # noqa: E402

from pipelining_seq.integrations import torchtitan as tt  # noqa: E402
from pipelining_seq.integrations.torchtitan import configs as titan_configs  # noqa: E402
from pipelining_seq.integrations.torchtitan.__main__ import _config_manager  # noqa: E402
from pipelining_seq.integrations.torchtitan.attention import (  # noqa: E402
    SUPPORTS_DOCUMENT_IDS,
    ChunkedAttention,
    UnsupportedAttentionError,
)
from pipelining_seq.integrations.torchtitan.partition import model_flop_sizes  # noqa: E402

pytestmark = pytest.mark.torchtitan


def seq_config(name: str = "llama3_sdpa", **section):
    config = tt.with_seq1f1b(getattr(titan_configs, name)(), tt.Seq1F1BConfig(**section))
    config.parallelism.pipeline_parallel_degree = 2
    config.parallelism.pipeline_parallel_schedule = "Seq1F1B"
    config.training.seq_len = 256
    return config


def inner_attentions(config):
    return [cfg.inner_attention for _, cfg, _, _ in config.model_spec.model.traverse(BaseAttention.Config)]


def test_enable_wires_seq1f1b():
    config = tt.enable(seq_config(n_seq_chunks=4, partition="balanced"))
    assert all(isinstance(a, ChunkedAttention.Config) for a in inner_attentions(config))
    assert config.model_spec.pipelining_fn._seq1f1b and config.model_spec.parallelize_fn._seq1f1b
    assert tt.enable(config) is config  # idempotent


def test_other_schedules_untouched():
    config = titan_configs.llama3_sdpa()
    config.parallelism.pipeline_parallel_degree = 2
    config.parallelism.pipeline_parallel_schedule = "1F1B"
    spec = config.model_spec
    tt.enable(config)
    # Only the gloo reduction fix wraps parallelize_fn; the model and pipelining are torchtitan's.
    assert config.model_spec.pipelining_fn is spec.pipelining_fn and config.model_spec.model is spec.model
    assert config.model_spec.parallelize_fn.__wrapped__ is spec.parallelize_fn
    assert all(isinstance(a, ScaledDotProductAttention.Config) for a in inner_attentions(config))


def test_pp1_leaves_the_model_untouched(caplog):
    config = seq_config(n_seq_chunks=4)
    config.parallelism.pipeline_parallel_degree = 1
    spec = config.model_spec
    with caplog.at_level("WARNING"):
        tt.enable(config)
    assert all(isinstance(a, ScaledDotProductAttention.Config) for a in inner_attentions(config))
    assert config.model_spec.pipelining_fn is spec.pipelining_fn
    assert "model is left unchanged" in caplog.text


def test_every_seq1f1b_schedule_by_name():
    from pipelining_seq.integrations.torchtitan.wiring import is_seq1f1b

    for name, base in (("seq1f1b", "ScheduleSeq1F1B"), ("INTERLEAVEDSEQ1F1B", "ScheduleInterleavedSeq1F1B"),
                       ("Seq1F1BZeroBubble", "PipelineScheduleSingle")):
        config = seq_config()
        config.parallelism.pipeline_parallel_schedule = name
        assert is_seq1f1b(config)
        cls = tt.get_schedule_class(name, n_seq_chunks=2)
        assert cls.__mro__[1].__name__ == base
        if name == "Seq1F1BZeroBubble":  # known by name, refused under torchtitan's FSDP2
            bad(config, "Seq1F1BZeroBubble: torchtitan wraps every model part in FSDP2")
            continue
        tt.enable(config)
        assert config.model_spec.pipelining_fn._seq1f1b


def test_unknown_schedule_refused_listing_every_name():
    config = seq_config()
    config.parallelism.pipeline_parallel_schedule = "Seq1F1BFast"
    with pytest.raises(ValueError) as err:
        tt.enable(config)
    for name in ("Seq1F1B", "InterleavedSeq1F1B", "Seq1F1BZeroBubble", "1F1B", "Interleaved1F1B", "ZBVZeroBubble"):
        assert name in str(err.value)
    assert "--parallelism.pipeline_parallel_schedule 'Seq1F1BFast'" in str(err.value)


def test_command_line_section():
    manager = _config_manager()()
    config = manager.parse_args([
        "--module", "llama3", "--config", "llama3_debugmodel",
        "--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule", "Seq1F1B",
        "--training.disable_cuda_graphs",
        "--seq1f1b.n_seq_chunks", "4", "--seq1f1b.partition", "balanced", "--seq1f1b.no-document-masking",
    ])
    assert config.seq1f1b.n_seq_chunks == 4 and config.seq1f1b.partition == "balanced"
    assert all(isinstance(a, ChunkedAttention.Config) for a in inner_attentions(config))
    assert config.model_spec.pipelining_fn._seq1f1b


def test_pipeline_module_restored_after_build():
    import torchtitan.distributed.pipeline_parallel as pp
    from torch.distributed.pipelining import PipelineStage

    from pipelining_seq import SequencePipelineStage
    from pipelining_seq.integrations.torchtitan.stages import SeqShardedPipelineStage
    from pipelining_seq.integrations.torchtitan.wiring import _seq1f1b_pipeline_module

    cls = tt.seq1f1b_schedule_class(n_seq_chunks=2)
    with _seq1f1b_pipeline_module(cls, "Seq1F1B", 1):
        assert pp.PipelineStage is SequencePipelineStage and pp.get_schedule_class("seq1f1b") is cls
        assert pp.get_schedule_class("1F1B").__name__ == "Schedule1F1B"
    with _seq1f1b_pipeline_module(cls, "Seq1F1B", 2):  # sequence parallelism over 2 TP ranks
        assert issubclass(pp.PipelineStage, SeqShardedPipelineStage) and pp.PipelineStage.seq_shards == 2
    assert pp.PipelineStage is PipelineStage and pp.get_schedule_class.__module__.startswith("torch.")


def test_flop_sizes_gqa_swiglu_mla():
    llama = model_flop_sizes(titan_configs.llama3_sdpa().model_spec.model)
    assert llama == dict(num_layers=6, hidden_size=256, num_heads=16, ffn_hidden_size=768, vocab_size=2048,
                         num_kv_heads=16, mlp="swiglu", head_dim=16, v_head_dim=16)
    qwen = model_flop_sizes(titan_configs.qwen3_sdpa().model_spec.model)
    assert (qwen["num_kv_heads"], qwen["head_dim"]) == (8, 128)
    ds = model_flop_sizes(titan_configs.deepseek_v3_sdpa().model_spec.model)
    assert (ds["head_dim"], ds["v_head_dim"]) == (192, 128)


def test_balanced_aligned_to_loss_chunks():
    config = seq_config(n_seq_chunks=4, partition="balanced")
    config.training.seq_len = 2048
    assert isinstance(config.loss, ChunkedLossWrapper.Config) and config.loss.num_chunks == 8
    from pipelining_seq.integrations.torchtitan.wiring import _chunk_lengths

    lengths = _chunk_lengths(config, config.seq1f1b, "balanced")
    assert sum(lengths) == 2048 and all(s % 8 == 0 for s in lengths)
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]


def bad(config, match):
    with pytest.raises(ValueError, match=match):
        tt.enable(config)


def test_multi_stage_layout_refused():
    config = seq_config()
    config.parallelism.pipeline_parallel_layers_per_stage = 1
    bad(config, "pipeline_parallel_layers_per_stage 1 gives 4 stages per rank")
    config = seq_config()
    config.parallelism.module_fqns_per_model_part = [["tok_embeddings"], ["layers.0"], ["layers.1"], ["norm"]]
    bad(config, "module_fqns_per_model_part gives 2 stages per rank")
    config = seq_config()
    config.parallelism.module_fqns_per_model_part = [["tok_embeddings"], ["layers.0"], ["norm"]]
    bad(config, "module_fqns_per_model_part has 3 parts")


def test_interleaved_layout():
    config = seq_config()
    config.parallelism.pipeline_parallel_schedule = "InterleavedSeq1F1B"
    config.parallelism.pipeline_parallel_layers_per_stage = 2  # (6 + 1 + 1) / 2 = 4 stages, 2 per rank
    tt.enable(config)
    config = seq_config()
    config.parallelism.pipeline_parallel_schedule = "InterleavedSeq1F1B"
    config.parallelism.pipeline_parallel_layers_per_stage = 4  # 2 stages, 1 per rank
    bad(config, "InterleavedSeq1F1B runs several stages per rank, but --parallelism.pipeline_parallel_layers_per_stage 4")
    config = seq_config()
    config.parallelism.pipeline_parallel_schedule = "InterleavedSeq1F1B"
    config.parallelism.pipeline_parallel_layers_per_stage = 3  # 3 stages over 2 ranks
    bad(config, "gives 3 stages .* not a multiple of --parallelism.pipeline_parallel_degree 2")


def test_chunks_that_do_not_fit_refused():
    bad(seq_config(n_seq_chunks=3), r"divisible by\s+--seq1f1b.n_seq_chunks \(3\)")
    bad(seq_config(n_seq_chunks=2, partition="100,100"), "sums to 200")
    bad(seq_config(n_seq_chunks=3, partition="100,156"), "gives 2 chunk lengths")
    bad(seq_config(n_seq_chunks=300), "does not fit training.seq_len 256")
    bad(seq_config(partition="first-heavy"), "--seq1f1b.partition 'first-heavy'")


def test_partition_against_loss_chunks_and_sequence_parallel():
    bad(seq_config(n_seq_chunks=2, partition="100,156"), "--loss.num_chunks 8")
    config = seq_config(n_seq_chunks=2, partition="129,127")
    config.loss = CrossEntropyLoss.Config()
    config.parallelism.tensor_parallel_degree = 2
    bad(config, "--parallelism.tensor_parallel_degree 2")
    config = seq_config()
    config.parallelism.context_parallel_degree = 2
    bad(config, "context_parallel_degree 2")


@dataclass(kw_only=True, slots=True)
class _MyAttentionConfig(Module.Config):
    pass


class MyAttention(Module):
    Config = _MyAttentionConfig


def test_unknown_attention_refused_naming_the_module():
    config = seq_config()
    config.model_spec.model.layers[3].attention.inner_attention = MyAttention.Config()
    with pytest.raises(UnsupportedAttentionError, match=r"layers\.3\.attention\.inner_attention is .*MyAttention"):
        tt.enable(config)


def test_never_convert_refuses_plain_attention():
    with pytest.raises(UnsupportedAttentionError, match=r"layers\.0\.attention\.inner_attention"):
        tt.enable(seq_config(attention="never"))


def test_compile_either_works_or_is_refused_at_start():
    config = seq_config()
    config.compile.enable = True
    try:
        tt.enable(config)
    except ValueError as err:
        assert "--compile.enable" in str(err) and "--compile.components loss" in str(err)
    else:
        assert config.model_spec.pipelining_fn._seq1f1b


# ----------------------------------------------------------------- the adapter, in process


def _units(lengths):
    from pipelining_seq.context import ChunkContext, KVCache

    cache, offset = KVCache(), 0
    for j, n in enumerate(lengths):
        yield ChunkContext(microbatch=0, chunk=j, n_chunks=len(lengths), offset=offset, length=n, cache=cache), offset
        offset += n


def _chunked(fn, lengths):
    from pipelining_seq.context import chunk_context

    outs = []
    for ctx, off in _units(lengths):
        with chunk_context(ctx):
            outs.append(fn(off, off + ctx.length))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("dq,dv,heads,kv_heads", [(16, 16, 4, 4), (16, 16, 4, 2), (24, 16, 4, 4), (16, 24, 2, 2)])
def test_adapter_equals_causal_attention(dq, dv, heads, kv_heads):
    """GQA and MLA head sizes, float64, whole sequence and 3 unequal chunks, outputs and gradients."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 20, heads, dq, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 20, kv_heads, dq, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 20, kv_heads, dv, dtype=torch.float64, generator=g, requires_grad=True)
    scale = 0.3

    def reference():
        qq, kk, vv = (t.transpose(1, 2) for t in (q, k, v))
        kk, vv = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (kk, vv))
        s = (qq @ kk.transpose(-1, -2)) * scale
        s = s.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
        return (s.softmax(-1) @ vv).transpose(1, 2)

    want = reference()
    adapter = ChunkedAttention(ChunkedAttention.Config())
    torch.testing.assert_close(adapter(q, k, v, scale=scale), want, rtol=0, atol=1e-12)
    dout = torch.randn_like(want)
    ref_grads = torch.autograd.grad(want, (q, k, v), dout)
    got = _chunked(lambda a, b: adapter(q[:, a:b], k[:, a:b], v[:, a:b], scale=scale), [9, 6, 5])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # Backward in reverse chunk order, as the schedule runs it: one graph per chunk here.
    from pipelining_seq.context import chunk_context

    units = list(_units([9, 6, 5]))
    outs = []
    for ctx, off in units:
        with chunk_context(ctx):
            outs.append((ctx, adapter(q[:, off:off + ctx.length], k[:, off:off + ctx.length],
                                      v[:, off:off + ctx.length], scale=scale), off))
    q.grad = k.grad = v.grad = None
    for ctx, out, off in reversed(outs):
        with chunk_context(ctx):
            out.backward(dout[:, off:off + ctx.length])
    for got_g, want_g in zip((q.grad, k.grad, v.grad), ref_grads):
        torch.testing.assert_close(got_g, want_g, rtol=0, atol=1e-10)


@pytest.mark.parametrize("with_positions", [True, False])
def test_model_chunks_equal_whole_sequence(with_positions):
    """llama3 debug model made chunk-aware: chunked forward equals the whole-sequence one, with
    torchtitan's per-document positions and without any (RoPE from the chunk offset)."""
    import copy

    from pipelining_seq.integrations.torchtitan.attention import convert_attention, install_chunk_inputs_hook

    config = titan_configs.llama3_sdpa().model_spec.model
    torch.manual_seed(0)
    ref_model = config.build()
    ref_model.init_weights(buffer_device=torch.device("cpu"))
    converted = copy.deepcopy(config)
    convert_attention(converted, document_masking=False)
    model = converted.build()
    model.load_state_dict(ref_model.state_dict())
    model.init_weights(buffer_device=torch.device("cpu"))
    model.load_state_dict(ref_model.state_dict())
    tokens = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(1))
    kw = {"positions": torch.cat([torch.arange(30), torch.arange(18)])[None].expand(2, -1)} if with_positions else {}
    with torch.no_grad():
        want = ref_model(tokens, **kw)
        install_chunk_inputs_hook(model, document_masking=False)
        got = _chunked(lambda a, b: model(tokens[:, a:b], **{n: t[:, a:b] for n, t in kw.items()}), [20, 16, 12])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_hook_positions_would_be_wrong():
    """Negative control for the test above: without the hook, a chunk's RoPE restarts at 0."""
    import copy

    from pipelining_seq.integrations.torchtitan.attention import convert_attention

    config = copy.deepcopy(titan_configs.llama3_sdpa().model_spec.model)
    convert_attention(config, document_masking=False)
    torch.manual_seed(0)
    model = config.build()
    model.init_weights(buffer_device=torch.device("cpu"))
    tokens = torch.randint(0, 2048, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens)
        got = _chunked(lambda a, b: model(tokens[:, a:b]), [16, 16])
    assert (got[:, 16:] - want[:, 16:]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not SUPPORTS_DOCUMENT_IDS, reason="ChunkedCausalAttention has no document_ids yet")
def test_block_causal_equals_torchtitan_flex():
    """Forward of llama3 with torchtitan's own FlexAttention and block-causal BlockMask (built from
    per-document positions) equals the converted model, whole and in 3 chunks (flex has no CPU
    backward, so forward only)."""
    import copy

    from pipelining_seq.integrations.torchtitan.attention import convert_attention, install_chunk_inputs_hook

    config = importlib.import_module("torchtitan.models.llama3.config_registry").llama3_debugmodel().model_spec.model
    torch.manual_seed(0)
    flex_model = config.build()
    flex_model.init_weights(buffer_device=torch.device("cpu"))
    converted = copy.deepcopy(config)
    convert_attention(converted, document_masking=True)
    model = converted.build()
    model.load_state_dict(flex_model.state_dict())
    model.init_weights(buffer_device=torch.device("cpu"))
    model.load_state_dict(flex_model.state_dict())
    install_chunk_inputs_hook(model, document_masking=True)
    seq = 256  # flex's 128-token blocks
    tokens = torch.randint(0, 2048, (2, seq), generator=torch.Generator().manual_seed(1))
    docs = [[70, 100, 86], [1, 129, 126]]  # documents crossing chunk boundaries; a 1-token one
    positions = torch.stack([torch.cat([torch.arange(n) for n in d]) for d in docs])
    with torch.no_grad():
        masks = flex_model.get_attention_masks(positions=positions)
        want = flex_model(tokens, positions=positions, attention_masks=masks)
        whole = model(tokens, positions=positions)
        got = _chunked(lambda a, b: model(tokens[:, a:b], positions=positions[:, a:b]), [100, 90, 66])
    torch.testing.assert_close(whole, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Negative control: the same model attending across documents differs.
    with torch.no_grad():
        causal = model(tokens)  # no positions: one document
    assert (causal - want).abs().max() > 1e-2
