"""The Hugging Face integration with the real `transformers.Trainer` on CPU: GPT-2's `Conv1D`, BERT and Llama built
from configs, plain checkpoints that `from_pretrained` loads into an untouched model, and exact resume."""

from __future__ import annotations

import re
import shutil

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


# --- resume, best model and rotation: a 12-step run saved every 4 steps, and its interruptions -----------------
def rigl_callback() -> DSTCallback:
    return DSTCallback(sparsity=0.9, method="rigl", update_every=2)


def train_12(output, *callbacks, resume=None, **overrides) -> tuple[GPT2LMHeadModel, Trainer]:
    model = gpt2()
    trainer = Trainer(model=model, args=arguments(output, max_steps=12, **overrides), train_dataset=data(),
                      callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def assert_same_run(model, callback, reference) -> None:
    """Bitwise the same weights, masks and history as the uninterrupted run `reference`."""
    reference_model, reference_callback, _ = reference
    assert callback.dst.step_count == 12 and callback.dst.history == reference_callback.dst.history
    a, b = reference_model.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    masks = reference_callback.dst.masks()
    assert all(torch.equal(masks[k], m) for k, m in callback.dst.masks().items())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    callback, output = rigl_callback(), tmp_path_factory.mktemp("straight")
    model, _ = train_12(output, callback)
    assert callback.dst.update_index >= 3
    return model, callback, output


def test_resume_reads_the_folder_the_trainer_resumes_from_even_outside_output_dir(tmp_path, uninterrupted):
    train_12(tmp_path / "run", rigl_callback(), StopAt(4))
    elsewhere = tmp_path / "copied" / "step-4"  # not under any output_dir, not named checkpoint-N
    elsewhere.parent.mkdir()
    (tmp_path / "run" / "checkpoint-4").rename(elsewhere)
    decoy = tmp_path / "new" / "checkpoint-4"  # where output_dir and the step would point: another step's state
    decoy.mkdir(parents=True)
    shutil.copy(uninterrupted[2] / "checkpoint-8" / "dst_state.pt", decoy / "dst_state.pt")
    callback = rigl_callback()
    model, _ = train_12(tmp_path / "new", callback, resume=str(elsewhere))
    assert_same_run(model, callback, uninterrupted)


class KilledDuringRotationError(Exception):
    """The process died right after the Trainer deleted old checkpoints (before any on_save)."""


def test_every_checkpoint_holds_the_controller_state_before_old_ones_are_rotated_away(tmp_path, monkeypatch,
                                                                                     uninterrupted):
    import transformers.trainer as trainer_module

    rotate = trainer_module.rotate_checkpoints

    def rotate_then_die(output_dir, **kwargs):
        rotate(output_dir, **kwargs)
        if (tmp_path / "run" / "checkpoint-8").is_dir():
            raise KilledDuringRotationError

    monkeypatch.setattr(trainer_module, "rotate_checkpoints", rotate_then_die)
    with pytest.raises(KilledDuringRotationError):
        train_12(tmp_path / "run", rigl_callback(), save_total_limit=1)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-8"]  # checkpoint-4 is gone
    callback = rigl_callback()
    model, _ = train_12(tmp_path / "run", callback, resume=True, save_total_limit=1)
    assert_same_run(model, callback, uninterrupted)


def test_load_best_model_at_end_restores_the_best_checkpoints_masks_with_its_weights(tmp_path):
    from safetensors.torch import load_file

    model, callback = gpt2(), DSTCallback(sparsity=0.9, method="set", update_every=1)
    # the highest eval loss is "best": an early checkpoint, whose masks differ from the final ones
    args = arguments(tmp_path / "run", max_steps=8, save_steps=2, eval_strategy="steps", eval_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=data(), eval_dataset=data(8), callbacks=[callback])
    trainer.train()
    best = tmp_path / "run" / trainer.state.best_model_checkpoint.split("/")[-1]
    assert best.name != "checkpoint-8"
    saved_weights = load_file(best / "model.safetensors")
    saved_masks = torch.load(best / "dst_state.pt", weights_only=True)
    last_masks = torch.load(tmp_path / "run" / "checkpoint-8" / "dst_state.pt", weights_only=True)
    assert any(not torch.equal(a, b) for a, b in zip(saved_masks["masks"], last_masks["masks"]))
    state = model.state_dict()
    assert saved_weights.keys() <= state.keys()
    assert all(torch.equal(saved_weights[k], state[k]) for k in saved_weights)  # exactly the best model
    assert callback.dst.state_dict()["masks_digest"] == saved_masks["masks_digest"]
    assert callback.dst.step_count == saved_masks["step_count"]

    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()  # an untouched model
    assert not dst_prune.is_sparse(loaded)
    ids = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    assert torch.load(tmp_path / "final" / "dst_state.pt", weights_only=True)["masks_digest"] == \
        saved_masks["masks_digest"]


@pytest.mark.slow
def test_fsdp2_checkpoints_gather_the_masks_on_every_rank_through_a_real_trainer(tmp_path):
    """2 CPU ranks: a sharded GPT-2 saves two checkpoints; the callback's gather runs on every rank (no hang)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "workers" / "hf_fsdp_save.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
               str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    assert ranks[0]["sharded"] and ranks[0]["in_sync"] and ranks[0]["updates"] > 0
    assert ranks[0]["saved"] == ["checkpoint-2", "checkpoint-4"] and ranks[0]["saved_step"] == 4
    assert ranks[0]["saved_digest"] == ranks[0]["digest"]  # the file holds the full (gathered) masks
