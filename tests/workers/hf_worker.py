"""Hugging Face models under Seq1F1B (importable by spawned ranks): tiny random-init
configs, float64; each rank runs its stage of ``split_causal_lm`` and compares with the
stock transformers model (sdpa attention, whole sequence) in the same process."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage
from pipelining_seq.integrations.transformers import balanced_seq_partition, split_causal_lm

VOCAB = 256
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, tie_word_embeddings=False, initializer_range=0.2)


def make_model(family: str, seed: int = 0, **over):
    """A stock transformers ``*ForCausalLM`` (sdpa), float64, train mode."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    cfg_cls, model_cls = classes[family]
    kw = dict(BASE)
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(over)
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**kw, attn_implementation="sdpa")).double().train()


def packed_positions(batch: int, seq: int, seed: int = 7) -> torch.Tensor:
    """HF's packed form: positions restart at 0 where a document starts (random boundaries)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        starts = torch.rand(seq, generator=g) < 0.12
        starts[0] = True
        pos, p = [], 0
        for s in starts.tolist():
            p = 0 if s else p + 1
            pos.append(p)
        rows.append(torch.tensor(pos))
    return torch.stack(rows)


def make_batch(case: dict):
    g = torch.Generator().manual_seed(1)
    b, s = case["batch"], case["seq"]
    x = torch.randint(0, VOCAB, (b, s), generator=g)
    y = torch.randint(0, VOCAB, (b, s), generator=g)
    docs = case.get("docs")
    pos = packed_positions(b, s)
    if docs == "position_ids":
        return x, y, {"position_ids": pos}
    if docs == "document_ids":
        return x, y, {"document_ids": torch.arange(s)[None, :] - pos}
    return x, y, {}


def ce_loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def stock_forward(model, x, kw):
    """The stock model on whole micro-batch sequences, with the packing given as HF takes it."""
    if "document_ids" in kw:  # block-causal mask as a 4D boolean mask, positions 0..S-1
        ids = kw["document_ids"]
        s = ids.shape[1]
        dist = torch.arange(s)[:, None] - torch.arange(s)[None, :]
        visible = dist >= 0
        if "sliding_attention" in (getattr(model.config, "layer_types", None) or []):
            raise NotImplementedError("one 4D mask cannot express per-layer windows")
        window = getattr(model.config, "sliding_window", None)  # Mistral: every layer
        if window is not None:
            visible &= dist < window
        mask = (ids[:, None, :, None] == ids[:, None, None, :]) & visible
        return model(x, attention_mask=mask, use_cache=False).logits
    return model(x, use_cache=False, **kw).logits


def reference(case: dict, x, y, kw):
    model = make_model(case["family"], **case.get("config", {}))
    m = case["m"]
    losses = []
    parts = [{k: v.chunk(m)[i] for k, v in kw.items()} for i in range(m)]
    for xs, ys, kws in zip(x.chunk(m), y.chunk(m), parts):
        loss = ce_loss(stock_forward(model, xs, kws), ys)
        (loss / m).backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad for n, p in model.named_parameters()}


def run_case(rank: int, world: int, case: dict) -> dict:
    model = make_model(case["family"], **case.get("config", {}))
    if case.get("checkpoint"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    part = split_causal_lm(model, rank, world, layers_per_stage=case.get("layers_per_stage"))
    k = case["k"]
    partition = balanced_seq_partition(model.config, k) if case.get("partition") == "balanced" else "uniform"
    stage = SequencePipelineStage(part, rank, world, torch.device("cpu"))
    sched = ScheduleSeq1F1B(stage, case["m"], ce_loss, n_seq_chunks=k, seq_partition=partition)
    x, y, kw = make_batch(case)
    losses, evals = [], []

    def run(fn, out):
        if world == 1:
            fn(x, target=y, losses=out, **kw)
        elif rank == 0:
            fn(x, **kw)
        elif rank == world - 1:
            fn(target=y, losses=out, **kw)
        else:
            fn(**kw)

    run(sched.step, losses)
    grads = {n: p.grad.clone() for n, p in part.named_parameters()}
    if case.get("eval"):
        run(sched.eval, evals)
    ref_losses, ref_grads = reference(case, x, y, kw)
    return dict(case=case, losses=losses, evals=evals, ref_losses=ref_losses, grads=grads,
                ref_grads={n: ref_grads[n] for n in grads}, all_names=sorted(ref_grads),
                leftover=len(stage.kv_cache))


def hf_worker(rank: int, world: int, cases: list[dict]) -> list[dict]:
    return [run_case(rank, world, case) for case in cases]
