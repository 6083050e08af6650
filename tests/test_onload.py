"""Sequential onloading (onload.py): calibrating with one decoder block at a time on the device must give the
model that calibrating with the whole model there gives, bit for bit, and hold at most one block there at once.
On the CPU the moves are no-ops, so the arithmetic of the two paths is compared exactly; the order of the moves is
recorded."""

import contextlib

import pytest
import torch

from atq import QuantConfig, calibration, ptq, quantize

from .conftest import make_llama

CONFIG = QuantConfig(group_size=32, rotation="hadamard", reconstruct_steps=4)


def windows():
    return torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))


def onloading(monkeypatch, record=None):
    """Make ``quantize(..., device="cpu")`` take the onloading path (the model "does not fit"), optionally
    recording each move."""
    monkeypatch.setattr(ptq, "same_device", lambda a, b: False)
    monkeypatch.setattr(ptq, "fits", lambda model, device: False)
    if record is not None:
        real = calibration.onloaded

        @contextlib.contextmanager
        def recorded(modules, device, home, whole):
            record.append(("on", [id(m) for m in modules], whole))
            with real(modules, device, home, whole):
                yield
            record.append(("off", [id(m) for m in modules], whole))

        monkeypatch.setattr(calibration, "onloaded", recorded)


def test_onloading_gives_the_whole_model_result_bit_for_bit(monkeypatch):
    whole = make_llama(seed=3, hidden=64)
    quantize(whole, CONFIG, calibration=windows(), quiet=True)
    onloading(monkeypatch)
    blockwise = make_llama(seed=3, hidden=64)
    quantize(blockwise, CONFIG, calibration=windows(), quiet=True, device="cpu")
    expected, got = whole.state_dict(), blockwise.state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    ids = windows()[:2]
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, blockwise(ids).logits)


def test_one_block_at_a_time_after_the_parts_outside_the_blocks(monkeypatch):
    record = []
    onloading(monkeypatch, record)
    model = make_llama(seed=3, hidden=64)
    quantize(model, CONFIG, calibration=windows(), quiet=True, device="cpu")
    blocks = [id(b) for b in model.model.layers]
    assert record[0][0] == "on" and not record[0][2] and record[1][0] == "off"  # embedding etc., for the inputs
    assert id(model.model.embed_tokens) in record[0][1] and not set(blocks) & set(record[0][1])
    turns = record[2:]
    assert [(kind, ids) for kind, ids, _ in turns] == [(k, [b]) for b in blocks for k in ("on", "off")]


def test_end_to_end_tuning_is_refused_when_blocks_are_onloaded(monkeypatch):
    onloading(monkeypatch)
    model = make_llama(seed=3, hidden=64)
    with pytest.raises(ValueError, match="end-to-end tuning trains the whole model"):
        quantize(model, CONFIG.replace(end_to_end_steps=4), calibration=windows(), quiet=True, device="cpu")


def test_onload_true_forces_it_and_false_forbids_it(monkeypatch):
    record = []
    onloading(monkeypatch, record)
    quantize(make_llama(seed=3, hidden=64), CONFIG, calibration=windows(), quiet=True, device="cpu", onload=False)
    assert record == []
    monkeypatch.setattr(ptq, "fits", lambda model, device: True)
    quantize(make_llama(seed=3, hidden=64), CONFIG, calibration=windows(), quiet=True, device="cpu", onload=True)
    assert len(record) == 2 + 2 * 2


@pytest.mark.parametrize(("device", "message"), [
    ("meta", "runs on 'cpu' or 'cuda'"), ("gpu", "not a device name"), ("cuda:7", "CUDA|GPU"),
])
def test_a_device_that_cannot_hold_the_model_is_refused_before_anything_changes(device, message):
    model = make_llama(seed=3, hidden=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        quantize(model, CONFIG, calibration=windows(), quiet=True, device=device)
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in model.state_dict().items())


def test_onload_refusals_come_before_the_model_changes():
    model = make_llama(seed=3, hidden=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="end-to-end tuning trains the whole model"):
        quantize(model, CONFIG.replace(end_to_end_steps=4), calibration=windows(), quiet=True, onload=True)
    with pytest.raises(ValueError, match="no calibration data"):
        quantize(model, QuantConfig(group_size=32, rotation="hadamard"), quiet=True, onload=True)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_rotated_gemma_onloads_with_its_input_hooks_inside_the_blocks(monkeypatch):
    """Gemma's rotation hooks run inside each block (the inputs form), so under onloading Q must reach the block's
    device rather than stay home with the parts outside the blocks. Home is played by the meta device (the CPU is
    the only real one here): the blocks must quantize as with the whole model, bit for bit."""
    from .test_rotation import make_gemma3

    config = CONFIG.replace(group_size=16)
    whole = make_gemma3(seed=3)
    quantize(whole, config, calibration=windows(), quiet=True)
    onloading(monkeypatch)
    real = calibration.onloaded

    @contextlib.contextmanager
    def home_on_meta(modules, device, home, whole_block):
        with real(modules, device, home, whole_block):
            yield
        if not whole_block:
            for module in modules:
                module._apply(lambda t: t.to("meta"), recurse=False)

    monkeypatch.setattr(calibration, "onloaded", home_on_meta)
    blockwise = make_gemma3(seed=3)
    quantize(blockwise, config, calibration=windows(), quiet=True, device="cpu")
    assert blockwise.model.atq_rotation.matrix.is_meta  # Q itself stayed home the whole time
    expected, got = whole.model.layers.state_dict(), blockwise.model.layers.state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CPU has no second device to onload to")
def test_a_rotated_gemma_onloads_from_the_cpu_to_the_gpu():
    """The real move, where a GPU exists: a rotated tiny Gemma held in CPU memory, calibrated one block at a time on
    the GPU, gives the blocks that calibrating it whole on the GPU gives."""
    from .test_rotation import make_gemma3

    config = CONFIG.replace(group_size=16)
    whole = make_gemma3(seed=3).cuda()
    quantize(whole, config, calibration=windows(), quiet=True)
    blockwise = make_gemma3(seed=3)
    quantize(blockwise, config, calibration=windows(), quiet=True, device="cuda", onload=True)
    assert blockwise.model.embed_tokens.weight.device.type == "cpu"
    expected, got = whole.model.layers.state_dict(), blockwise.model.layers.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name].cpu(), value.cpu(), rtol=1e-5, atol=1e-6, msg=name)
