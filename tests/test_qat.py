from dataclasses import asdict

import pytest
import torch

from atq import PackedTernaryLinear, QuantConfig, TernaryLinear, checkpoint, load_quantized, save_quantized
from atq.qat import (
    TrainConfig,
    batch_indices,
    distillation_loss,
    learning_rate,
    prepare_qat,
    step_loss,
    to_packed,
    train,
)

from .conftest import make_llama


def windows(n=12, seq=24):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(7))


def test_batches_cover_each_epoch_once_and_depend_only_on_the_step():
    config = TrainConfig(steps=10, batch_size=3, grad_accum=2, seed=5)
    first_epoch = torch.cat([batch_indices(s, m, 12, config) for s in range(2) for m in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(12))
    assert torch.equal(batch_indices(7, 1, 12, config), batch_indices(7, 1, 12, config))


def test_schedule_warms_up_then_decays_to_zero():
    config = TrainConfig(steps=10, lr=1.0, warmup_steps=2)
    assert learning_rate(0, config) == 0.5 and learning_rate(1, config) == 1.0
    assert learning_rate(2, config) == pytest.approx(1.0) and learning_rate(10, config) == pytest.approx(0.0)


def test_distillation_loss_is_zero_for_equal_logits_and_matches_kl():
    logits = torch.randn(2, 5, 11)
    assert float(distillation_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 11)
    p = torch.softmax(other.reshape(-1, 11).double(), -1)
    q = torch.softmax(logits.reshape(-1, 11).double(), -1)
    expected = float((p * (p.log() - q.log())).sum(-1).mean())
    assert float(distillation_loss(logits, other, 1.0)) == pytest.approx(expected, rel=1e-4)


def test_distillation_training_lowers_the_loss_and_packs():
    teacher, student = make_llama(seed=1), make_llama()  # a different teacher: something to learn
    names = prepare_qat(student, QuantConfig(group_size=32))
    assert len(names) == 14 and all(isinstance(student.get_submodule(n), TernaryLinear) for n in names)
    history = train(student, windows(), TrainConfig(steps=30, batch_size=4, lr=1e-3), teacher=teacher, quiet=True)
    assert sum(h["loss"] for h in history[-5:]) < 0.8 * sum(h["loss"] for h in history[:5])
    to_packed(student)
    assert all(isinstance(student.get_submodule(n), PackedTernaryLinear) for n in names)


def test_killed_run_resumes_to_the_uninterrupted_losses(tmp_path, monkeypatch):
    config = TrainConfig(steps=6, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, checkpoint_every=3)
    data, teacher = windows(), make_llama(seed=1)
    straight = make_llama()
    prepare_qat(straight, QuantConfig())
    full = train(straight, data, config, teacher=teacher, quiet=True)

    first = make_llama()
    prepare_qat(first, QuantConfig())
    partial = _train_until(first, data, config, teacher, tmp_path / "ck", stop_after=3, monkeypatch=monkeypatch)
    resumed = make_llama(seed=3)  # different init: everything must come from the checkpoint
    prepare_qat(resumed, QuantConfig())
    rest = train(resumed, data, config, teacher=teacher, checkpoint_dir=tmp_path / "ck", quiet=True)
    assert [h["loss"] for h in partial] == [h["loss"] for h in full[:3]]
    assert [h["loss"] for h in rest] == [h["loss"] for h in full]


def _train_until(model, data, config, teacher, directory, stop_after, monkeypatch):
    """Run ``train`` and kill it (an exception) right after the checkpoint at ``stop_after`` steps."""
    real = checkpoint.save_checkpoint
    seen = {}

    def save_then_die(directory, model, optimizer, state):
        real(directory, model, optimizer, state)
        if state["step"] == stop_after:
            seen["history"] = list(state["history"])
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(model, data, config, teacher=teacher, checkpoint_dir=directory, quiet=True)
    return seen["history"]


def test_trained_model_saves_and_loads_identically(tmp_path):
    student = make_llama()
    prepare_qat(student, QuantConfig())
    train(student, windows(), TrainConfig(steps=2, batch_size=4), quiet=True)
    to_packed(student)
    save_quantized(student, tmp_path / "a", dtype="float32")
    ids = windows(2, 16)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "a")(ids).logits, student(ids).logits)


def _distributed_worker(rank: int, world: int, directory: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{directory}/rendezvous")
    try:
        torch.set_num_threads(1)
        student, teacher = make_llama(), make_llama(seed=1)
        prepare_qat(student, QuantConfig())
        history = train(student, windows(), TrainConfig(steps=3, batch_size=4, grad_accum=2, lr=1e-3),
                        teacher=teacher, quiet=True)
        if rank == 0:
            torch.save({"losses": [h["loss"] for h in history], "state": student.state_dict()},
                       f"{directory}/result.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    single, teacher = make_llama(), make_llama(seed=1)
    prepare_qat(single, QuantConfig())
    history = train(single, windows(), TrainConfig(steps=3, batch_size=4, grad_accum=2, lr=1e-3), teacher=teacher,
                    quiet=True)
    assert result["losses"] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    for name, value in single.state_dict().items():
        assert torch.allclose(result["state"][name], value, atol=1e-5), name


def test_time_budget_stops_with_a_checkpoint_that_resumes_the_same_run(tmp_path):
    config = TrainConfig(steps=4, batch_size=4, lr=1e-3)
    data, teacher = windows(), make_llama(seed=1)
    straight = make_llama()
    prepare_qat(straight, QuantConfig())
    full = train(straight, data, config, teacher=teacher, quiet=True)
    seen = []
    segmented = make_llama()
    prepare_qat(segmented, QuantConfig())
    log = tmp_path / "log.json"
    first = train(segmented, data, config, teacher=teacher, checkpoint_dir=tmp_path / "ck", quiet=True,
                  max_seconds=0.0, on_step=lambda done, seconds: seen.append(done), log_path=log)
    assert len(first) == 1 and seen == [1]  # the budget is spent after one step: stop, checkpoint, return
    import json

    assert [h["step"] for h in json.loads(log.read_text())["history"]] == [0]
    rest = train(segmented, data, config, teacher=teacher, checkpoint_dir=tmp_path / "ck", quiet=True)
    assert [h["loss"] for h in rest] == [h["loss"] for h in full]
    assert all(h["tokens_per_s"] > 0 for h in rest) and rest[-1]["tokens"] == 4 * 4 * 24


def test_hidden_state_distillation_adds_a_term():
    student, teacher = make_llama(), make_llama(seed=1)
    batch = windows(2, 16)
    logits_only = step_loss(student, teacher, batch, TrainConfig(steps=1))
    with_hidden = step_loss(student, teacher, batch, TrainConfig(steps=1, hidden_weight=1.0))
    assert float(with_hidden) > float(logits_only) > 0


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    """A NaN loss (here: a NaN put into a norm gain after the checkpoint at step 2) raises, naming the step and
    the learning rate, and the checkpoint on disk still holds the finite step-2 state."""
    student, config = make_llama(), TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=2)
    prepare_qat(student, QuantConfig())

    def poison(done: int, seconds: float) -> None:
        if done == 2:
            with torch.no_grad():
                student.model.norm.weight[0] = float("nan")

    with pytest.raises(FloatingPointError, match="diverged: loss nan at step 2 .*lower the learning rate"):
        train(student, windows(), config, checkpoint_dir=tmp_path / "ck", quiet=True, on_step=poison)
    fresh = make_llama(seed=3)
    prepare_qat(fresh, QuantConfig())
    optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    state = checkpoint.load_checkpoint(tmp_path / "ck", fresh, optimizer)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in fresh.parameters())


def test_a_non_finite_gradient_skips_its_step_and_training_goes_on():
    """An inf gradient with a finite loss (what a bf16 overflow in the backward pass looks like) skips that
    optimizer step, leaving the weights as they were, instead of letting clipping spread NaN into them."""
    student, config = make_llama(), TrainConfig(steps=5, batch_size=4, lr=1e-3)
    prepare_qat(student, QuantConfig())
    poisoned, snapshots = [False], {}
    student.model.norm.weight.register_hook(lambda grad: grad * float("inf") if poisoned[0] else grad)

    def watch(done: int, seconds: float) -> None:
        snapshots[done] = [p.detach().clone() for p in student.parameters()]
        poisoned[0] = done == 2  # step index 2 (the third step) gets the inf gradient

    history = train(student, windows(), config, quiet=True, on_step=watch)
    assert [h["skipped"] for h in history] == [False, False, True, False, False]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # the skipped step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_steps_skipped_again_and_again_stop_training():
    student = make_llama()
    prepare_qat(student, QuantConfig())
    student.model.norm.weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(FloatingPointError, match="9 steps in a row up to step 8 had a non-finite gradient"):
        train(student, windows(), TrainConfig(steps=20, batch_size=4), quiet=True)


@pytest.mark.parametrize("loss", ["kl", "cakld"])
def test_compiled_blocks_train_like_eager_and_are_uncompiled_afterwards(loss):
    data, teacher = windows(), make_llama(seed=1)
    runs = {}
    for mode in ("off", "blocks"):
        student = make_llama()
        prepare_qat(student, QuantConfig(), learned_scales=True)
        runs[mode] = train(student, data, TrainConfig(steps=3, batch_size=4, lr=1e-3, compile=mode, loss=loss),
                           teacher=teacher, quiet=True)
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in student.modules())
    assert [h["loss"] for h in runs["blocks"]] == pytest.approx([h["loss"] for h in runs["off"]], rel=1e-4)
    assert TrainConfig(steps=1, compile=True).compile == "blocks"
    with pytest.raises(ValueError, match="compile must be one of"):
        TrainConfig(steps=1, compile="fast")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_gradient_equals_autograd_through_log_softmax(temperature):
    """The fused KL's saved gradient is the gradient autograd finds through the plain formula (fp64 here; the
    fused form computes in fp32, hence the tolerance)."""
    student = torch.randn(3, 4, 13, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, 13, dtype=torch.float64)
    log_s = torch.log_softmax(student.reshape(-1, 13) / temperature, -1)
    log_t = torch.log_softmax(teacher.reshape(-1, 13) / temperature, -1)
    reference = (log_t.exp() * (log_t - log_s)).sum() / 12 * temperature**2
    (expected,) = torch.autograd.grad(3.0 * reference, student)
    fused = distillation_loss(student, teacher, temperature)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    (got,) = torch.autograd.grad(3.0 * fused, student)
    assert got.dtype == student.dtype and torch.allclose(got, expected, rtol=1e-5, atol=1e-8)


def _kl_rows(p_log, q_log):
    """KL(p || q) of each row, from float64 log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("confidence", [None, 0.0, 0.3, 1.0])
def test_cakld_is_the_confidence_weighted_mix_of_both_kl_directions(temperature, confidence):
    """CAKLD against a float64 formula of both directions (BitDistiller's weighting: γ on KL(student || teacher)),
    value and gradient; γ None is the teacher's mean top probability of this batch."""
    from atq.qat import confidence_aware_loss

    student = torch.randn(3, 4, 13, dtype=torch.float64, requires_grad=True)
    teacher = 3 * torch.randn(3, 4, 13, dtype=torch.float64)  # a confident teacher: γ far from 1/13
    log_s = torch.log_softmax(student.reshape(-1, 13) / temperature, -1)
    log_t = torch.log_softmax(teacher.reshape(-1, 13) / temperature, -1)
    gamma = log_t.exp().amax(-1).mean() if confidence is None else confidence
    forward, reverse = _kl_rows(log_t, log_s).mean(), _kl_rows(log_s, log_t).mean()
    reference = (gamma * reverse + (1 - gamma) * forward) * temperature**2
    (expected,) = torch.autograd.grad(2.0 * reference, student)
    fused = confidence_aware_loss(student, teacher, temperature, confidence)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    (got,) = torch.autograd.grad(2.0 * fused, student)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-8)
    if confidence == 0.0:  # γ = 0 is the plain logit KL
        assert fused.item() == pytest.approx(distillation_loss(student, teacher, temperature).item(), rel=1e-6)
    if confidence == 1.0:  # γ = 1 is the reverse KL alone
        assert fused.item() == pytest.approx((reverse * temperature**2).item(), rel=1e-6)


def test_cakld_is_the_loss_of_a_step_and_its_confidence_can_be_estimated_once():
    from atq.qat import confidence_aware_loss, teacher_confidence

    student, teacher, batch = make_llama(), make_llama(seed=1), windows(4, 12)
    prepare_qat(student, QuantConfig())
    kl = step_loss(student, teacher, batch, TrainConfig(steps=1))
    cakld_0 = step_loss(student, teacher, batch, TrainConfig(steps=1, loss="cakld", confidence=0.0))
    assert cakld_0.item() == pytest.approx(kl.item(), rel=1e-6)
    with torch.no_grad():
        s_logits, t_logits = student(batch).logits, teacher(batch).logits
    for confidence in (None, 0.7):
        got = step_loss(student, teacher, batch, TrainConfig(steps=1, loss="cakld", confidence=confidence))
        assert got.item() == pytest.approx(confidence_aware_loss(s_logits, t_logits, 1.0, confidence).item(), rel=1e-5)
    top = torch.softmax(t_logits[:2].double(), -1).amax(-1).mean()  # the first batch of two windows only
    assert teacher_confidence(teacher, batch, batch_size=2, max_batches=1) == round(float(top), 4)
    with pytest.raises(ValueError, match="TrainConfig.confidence is CAKLD's γ, but loss is 'kl'"):
        TrainConfig(steps=1, confidence=0.5)
    with pytest.raises(ValueError, match=r"TrainConfig.confidence must be None or in \[0, 1\], got 1.5"):
        TrainConfig(steps=1, loss="cakld", confidence=1.5)


def test_a_checkpoint_from_before_a_new_field_resumes_as_its_default():
    """A TrainConfig field added later (``loss``) reads as its default in an older checkpoint: that run resumes,
    and a run that changed the new field is refused."""
    from atq.checkpoint import same_config

    config = TrainConfig(steps=4)
    saved = {k: v for k, v in asdict(config).items() if k != "loss"}
    assert same_config(saved, config)
    assert not same_config(saved, TrainConfig(steps=4, loss="cakld"))
    assert not same_config({**saved, "steps": 5}, config)
