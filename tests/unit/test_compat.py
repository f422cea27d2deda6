"""Fails loudly when a private torch API that _compat wraps moves or changes."""

import inspect

import pytest
import torch

from pipelining_seq import _compat, kernels


def test_private_pipelining_apis_present():
    for name in ("Action", "ComputationType", "batch_p2p", "wait_batch_p2p", "add_send_recv",
                 "validate_schedule", "simulate_comms_compute", "format_pipeline_order", "add_reduce_grad"):
        assert getattr(_compat, name) is not None, name
    assert str(_compat.Action(0, _compat.FORWARD, 3)) == "0F3"
    assert "buffer" in inspect.signature(_compat.RecvInfo.__init__).parameters


def test_attention_kernel_schemas():
    fwd = str(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default._schema)
    bwd = str(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default._schema)
    assert "-> (Tensor output, Tensor logsumexp)" in fwd
    assert "Tensor out, Tensor logsumexp, float dropout_p, bool is_causal" in bwd
    cuda_fwd = str(torch.ops.aten._scaled_dot_product_flash_attention.default._schema)
    assert "(Tensor output, Tensor logsumexp, Tensor cum_seq_q" in cuda_fwd
    # The memory-efficient kernels (masked and float32 tiles on CUDA), as kernels.py calls them.
    eff_fwd, eff_bwd = (str(op.default._schema) for op in _compat.efficient_attention_ops())
    assert ("(Tensor query, Tensor key, Tensor value, Tensor? attn_bias, bool compute_log_sumexp, "
            "float dropout_p=0., bool is_causal=False, *, float? scale=None) -> (Tensor output, "
            "Tensor log_sumexp, Tensor philox_seed, Tensor philox_offset)") in eff_fwd
    assert ("Tensor key, Tensor value, Tensor attn_bias, Tensor out, Tensor logsumexp, Tensor philox_seed, "
            "Tensor philox_offset, float dropout_p, bool[4] grad_input_mask, bool is_causal=False, *, "
            "float? scale=None) -> (Tensor, Tensor, Tensor, Tensor)") in eff_bwd


def test_kernels_agree_with_math_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=g) for _ in range(4))
    for causal in (False, True):
        out, lse, aux = kernels.flash_forward(q, k, v, causal=causal, scale=0.3)
        mout, mlse, _ = kernels._math_forward(q, k, v, causal, 0.3)
        torch.testing.assert_close(out, mout, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse, mlse, atol=1e-12, rtol=0)
        grads = kernels.flash_backward(do, q, k, v, out, lse, aux, causal=causal, scale=0.3)
        mgrads = kernels._math_backward(do, q, k, v, out, lse, None, causal, 0.3)
        for a, b in zip(grads, mgrads):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_overridden_hooks_exist_in_this_torch():
    from pipelining_seq import (
        ScheduleInterleavedSeq1F1B,
        ScheduleSeq1F1B,
        ScheduleSeq1F1BZeroBubble,
        SequencePipelineStage,
    )

    for cls in (ScheduleSeq1F1B, ScheduleInterleavedSeq1F1B, ScheduleSeq1F1BZeroBubble, SequencePipelineStage):
        assert _compat.check_overrides(cls) is cls
    for base, groups in _compat.OVERRIDDEN_HOOKS.items():
        torch_cls = _compat._TORCH_BASES[base]
        for group in groups:
            assert any(hasattr(torch_cls, name) for name in group), (torch.__version__, base, group)


def test_an_undeclared_or_vanished_hook_is_refused(monkeypatch):
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    class Sneaky(PipelineScheduleSingle):
        def _maybe_get_loss(self, stage, mb_index):  # a real private torch method, not declared
            return None

    with pytest.raises(RuntimeError, match="_maybe_get_loss.*does not declare"):
        _compat.check_overrides(Sneaky)
    monkeypatch.setitem(_compat.OVERRIDDEN_HOOKS, "PipelineScheduleSingle", (("_renamed_in_torch_3",),))

    class Stale(PipelineScheduleSingle):
        def _renamed_in_torch_3(self):
            pass

    with pytest.raises(RuntimeError, match="silently stop applying"):
        _compat.check_overrides(Stale)


def test_private_state_read_exists_on_real_instances(world_of_one):
    from pipelining_seq import ScheduleSeq1F1B, ScheduleSeq1F1BZeroBubble, SequencePipelineStage
    from pipelining_seq.models import GPT, GPTConfig

    stage = SequencePipelineStage(GPT(GPTConfig(n_layers=1)), 0, 1, torch.device("cpu"))
    sched = ScheduleSeq1F1B(stage, 2, lambda o, t: o.sum(), n_seq_chunks=2)
    runtime_stage = SequencePipelineStage(GPT(GPTConfig(n_layers=1)), 0, 1, torch.device("cpu"))
    runtime = ScheduleSeq1F1BZeroBubble(runtime_stage, 2, lambda o, t: o.sum(), n_seq_chunks=2)
    objs = {"PipelineScheduleSingle": sched, "PipelineScheduleRuntime": runtime, "PipelineStage": stage}
    for base, names in _compat.READ_STATE.items():
        missing = [n for n in names if not hasattr(objs[base], n)]
        assert not missing, (torch.__version__, base, missing)


def test_lr_scheduler_step_matches_stepping():
    def sched():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    stepped, placed = sched(), sched()
    for _ in range(4):
        stepped.optimizer.step()
        stepped.step()
    _compat.set_lr_scheduler_step(placed, 4)
    assert placed.last_epoch == stepped.last_epoch and placed.get_last_lr() == stepped.get_last_lr()
    assert placed.optimizer.param_groups[0]["lr"] == stepped.optimizer.param_groups[0]["lr"]


def test_the_core_loads_no_model_no_tool_and_no_transformers():
    # The FLOP model takes sizes; the reference GPT maps its config onto it. Importing the
    # package must not load the reference model, nor the measurement/test helpers; without
    # transformers installed the core imports and the adapter refuses (one interpreter: ~3 s).
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import pipelining_seq, pipelining_seq.schedules, pipelining_seq.integrations\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pipelining_seq.models', 'pipelining_seq.tools'))))\n"
        "try:\n    import pipelining_seq.integrations.transformers\nexcept ImportError: print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "refused"], out
