"""The Hugging Face integration with the real `transformers.Trainer` on CPU: GPT-2's `Conv1D`, BERT and Llama built
from configs, plain checkpoints that `from_pretrained` loads into an untouched model, and exact resume."""

from __future__ import annotations

import re

import pytest
import torch

import dst_prune

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from dst_prune.integrations.hf import DSTCallback  # noqa: E402

VOCAB = 64


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0,
                                      bos_token_id=0))


def data(n: int = 48) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (16,), generator=g)), "labels": ids} for _ in range(n)]


def arguments(output, **overrides) -> TrainingArguments:
    return TrainingArguments(**{"output_dir": str(output), "max_steps": 8, "per_device_train_batch_size": 4,
                                "gradient_accumulation_steps": 2, "save_steps": 4, "report_to": [], "use_cpu": True,
                                "disable_tqdm": True, "logging_steps": 1000, "seed": 0, "learning_rate": 1e-3,
                                **overrides})


class StopAt(TrainerCallback):
    """An interruption: training stops after `step` (after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_gpt2_conv1d_layers_are_sparse_targets_with_their_layout():
    model = gpt2()
    dst = dst_prune.apply(model, sparsity=0.5, granularity="channel")
    names = [t.name for t in dst.targets]
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.1.mlp.c_proj.weight" in names
    assert not any("wte" in n or "wpe" in n or "lm_head" in n for n in names)  # embeddings and head stay dense
    c_fc = model.transformer.h[0].mlp.c_fc  # weight (in=32, out=128): a channel is a column
    assert c_fc.weight_mask.all(0).sum() == 64 and (c_fc.weight_mask.any(0) == c_fc.weight_mask.all(0)).all()
    two_four = gpt2()
    dst_prune.apply(two_four, sparsity=0.5, granularity="2:4")
    blocks = two_four.transformer.h[0].mlp.c_proj.weight_mask  # (in=128, out=32): blocks of 4 inputs along dim 0
    assert (blocks.reshape(32, 4, 32).sum(1) == 2).all()


def test_bert_and_llama_from_configs_train_sparse_with_head_and_embeddings_dense():
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    for model, head in ((bert, "classifier.weight"), (llama, "lm_head.weight")):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        dst = dst_prune.apply(model, sparsity=0.9, method="rigl", total_steps=4, update_every=1, optimizer=optimizer)
        names = [t.name for t in dst.targets]
        assert head not in names and not any("embed" in n for n in names) and len(names) >= 8
        for _ in range(2):
            ids = torch.randint(0, VOCAB, (2, 8))
            out = model(input_ids=ids, labels=torch.tensor([0, 1]) if model is bert else ids)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            dst.step()
        assert dst.update_index == 2 and f"{dst.sparsity:.4f}" == "0.9000"


def test_tied_weights_keep_their_clear_refusal():
    with pytest.raises(dst_prune.DSTError, match=re.escape("lm_head.weight is tied: the same tensor is the parameter")):
        dst_prune.apply(gpt2(), sparsity=0.9, include=["lm_head.weight"])



def test_load_sparse_state_dict_takes_save_pretrained_output_without_tied_duplicates(tmp_path):
    from safetensors.torch import load_file

    model = gpt2()
    dst = dst_prune.apply(model, sparsity=0.9)
    with torch.no_grad():
        for target in dst.targets:  # a trained-looking model: no active weight at zero
            target.module.weight_orig.add_(0.01)
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert "lm_head.weight" not in saved and "transformer.wte.weight" in saved  # the tied head is left out
    fresh = gpt2()
    with torch.no_grad():
        fresh.transformer.wte.weight.zero_()
    loaded = dst_prune.load_sparse_state_dict(fresh, saved, masks=dst.state_dict())
    assert loaded.budget == dst.budget
    ids = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(fresh.eval()(ids).logits, model.eval()(ids).logits)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied, to the checkpoint's embedding

@pytest.mark.slow
def test_trainer_run_is_exact_loads_with_from_pretrained_and_resumes_bitwise(tmp_path):
    straight_model, callback = gpt2(), DSTCallback(sparsity=0.9, method="rigl", update_every=2)
    Trainer(model=straight_model, args=arguments(tmp_path / "straight"), train_dataset=data(),
            callbacks=[callback]).train()
    dst = callback.dst
    assert dst.step_count == 8 and dst.update_index == 2 and dst.budget == sum(t.active() for t in dst.targets)
    assert dst.schedule.stop_step == 6  # 0.75 of the Trainer's max_steps
    straight_model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()  # an untouched model
    ids = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(loaded(ids).logits, straight_model.eval()(ids).logits)

    first = gpt2()
    Trainer(model=first, args=arguments(tmp_path / "run"), train_dataset=data(),
            callbacks=[DSTCallback(sparsity=0.9, method="rigl", update_every=2), StopAt(4)]).train()
    resumed_model, resumed = gpt2(), DSTCallback(sparsity=0.9, method="rigl", update_every=2)
    Trainer(model=resumed_model, args=arguments(tmp_path / "run"), train_dataset=data(),
            callbacks=[resumed]).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed.dst.step_count == 8 and resumed.dst.history == dst.history
    straight_state, resumed_state = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(straight_state[k], resumed_state[k]) for k in straight_state)
    assert all(torch.equal(a, b) for a, b in zip(dst.masks().values(), resumed.dst.masks().values()))

    dense = gpt2()  # a checkpoint of a run without dst_prune cannot be resumed sparse
    Trainer(model=dense, args=arguments(tmp_path / "dense", max_steps=4), train_dataset=data()).train()
    with pytest.raises(dst_prune.DSTError, match=re.escape("has no dst_state.pt: it was saved by a run "
                                                             "without dst_prune")):
        Trainer(model=gpt2(), args=arguments(tmp_path / "dense"), train_dataset=data(),
                callbacks=[DSTCallback(sparsity=0.9)]).train(resume_from_checkpoint=True)
    with pytest.raises(dst_prune.DSTError, match=re.escape("state was saved with sparsity=0.9")):
        Trainer(model=gpt2(), args=arguments(tmp_path / "run"), train_dataset=data(),
                callbacks=[DSTCallback(sparsity=0.8, method="rigl")]).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))


def test_callback_arguments_are_checked_when_it_is_built():
    with pytest.raises(dst_prune.DSTError, match="sparsity must be a number in"):
        DSTCallback(sparsity=1.5)
    with pytest.raises(dst_prune.DSTError, match="method='rigl' has no hyperparameter 'threshold'"):
        DSTCallback(sparsity=0.9, method="rigl", threshold=3)
    with pytest.raises(dst_prune.DSTError, match="takes the trainer's optimizer itself"):
        DSTCallback(sparsity=0.9, optimizer=object())
