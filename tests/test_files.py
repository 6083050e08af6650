"""Real kills: a subprocess saving an artifact (or training with checkpoints) is killed with SIGKILL at a chosen
step, so no cleanup code runs, as with a power cut or the OOM killer. Then the previous artifact still loads bit
for bit (or the new one does), the leftovers are gone after the next save, and training resumes from the last
checkpoint, never from step 0.

The kill comes from a fault hook in the child (CHILD below): it wraps one step of files.py (or the writer of the
weights) so that os.kill(os.getpid(), SIGKILL) follows it: in the middle of writing the weights ("mid-write"),
after the new directory is complete and fsynced but before it is published ("before-publish"), and right after
the first file-system change that publishing makes ("inside-publish": today the atomic exchange, before the old
version is removed; in a publish of two renames, the gap between them).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atq import QuantConfig, files, load_quantized, quantize, save_quantized
from atq.qat import TrainConfig, prepare_qat, train

from .conftest import make_llama

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(steps=6, batch_size=4, lr=1e-3, checkpoint_every=2)
DATA = torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(7))

CHILD = r'''
import os, signal, sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from atq import QuantConfig, files, quantize, save_quantized
from atq.qat import prepare_qat, train
from tests.test_files import CONFIG, DATA, model

job, target, point, call = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
calls = [0]


def due():
    calls[0] += 1
    return calls[0] == call


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def writes_half(real, path_of):
    """``real`` (a weights writer); on the chosen call the file it wrote is cut to half, then the kill."""
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if due():
            path = Path(path_of(args))
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            die()
        return result
    return wrapper


publishing = [False]


def publish_hook(real):
    """files._publish: killed on entry ("before-publish"), or flagged so the first file-system change it makes
    is followed by the kill ("inside-publish": after the exchange, before the old version is removed)."""
    def wrapper(*args, **kwargs):
        if due():
            if point == "before-publish":
                die()
            publishing[0] = True
        return real(*args, **kwargs)
    return wrapper


def then_die(real):
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if publishing[0]:
            die()
        return result
    return wrapper


if point == "mid-write" and job == "save":
    import safetensors.torch
    safetensors.torch.save_file = writes_half(safetensors.torch.save_file, lambda args: args[1])
elif point == "mid-write":
    torch.save = writes_half(torch.save, lambda args: args[1])
else:
    import shutil
    files._publish = publish_hook(files._publish)
    files._exchange = then_die(files._exchange)
    for name in ("rename", "replace", "rmdir"):
        setattr(os, name, then_die(getattr(os, name)))
    shutil.rmtree = then_die(shutil.rmtree)

if job == "save":
    save_quantized(model(seed=9), target, dtype="float32")
else:
    train(model(train=True), DATA, CONFIG, checkpoint_dir=target, quiet=True)
print("not killed")
'''


def model(seed: int = 0, train: bool = False) -> torch.nn.Module:
    """The child's model, built the same way in the parent to compare against."""
    net = make_llama(seed=seed)
    if train:
        prepare_qat(net, QuantConfig(mode="absmean"))
    else:
        quantize(net, QuantConfig(mode="absmean"), quiet=True)
    return net


def run_killed(tmp_path: Path, job: str, target: Path, point: str, call: int = 1) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    result = subprocess.run([sys.executable, str(script), job, str(target), point, str(call)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stdout, result.stderr[-3000:])


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: files.sha256_file(p) for p in sorted(directory.iterdir())}


def logits(net: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return net(DATA[:2]).logits


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("point", ["mid-write", "before-publish", "inside-publish"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_artifact(tmp_path, point):
    target = tmp_path / "artifact"
    save_quantized(model(seed=0), target, dtype="float32")
    before, old = snapshot(target), logits(load_quantized(target))
    run_killed(tmp_path, "save", target, point)
    assert hidden(tmp_path), "the kill left no temporary sibling: it did not happen where the hook put it"
    if point == "inside-publish":  # the new version is published; the old one waits at the temporary name
        assert torch.equal(logits(load_quantized(target)), logits(model(seed=9)))
    else:
        assert snapshot(target) == before and torch.equal(logits(load_quantized(target)), old)
    save_quantized(model(seed=3), target, dtype="float32")  # the next save removes what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "child.py"]
    assert torch.equal(logits(load_quantized(target)), logits(model(seed=3)))


def test_a_first_save_killed_before_publishing_leaves_nothing_at_the_path(tmp_path):
    target = tmp_path / "artifact"
    run_killed(tmp_path, "save", target, "before-publish")
    assert not target.exists() and hidden(tmp_path)
    save_quantized(model(seed=3), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "child.py"]


@pytest.mark.parametrize(("point", "resumed_from"), [("mid-write", 2), ("before-publish", 2), ("inside-publish", 4)])
def test_training_killed_at_its_second_checkpoint_resumes_from_the_last_one(tmp_path, point, resumed_from):
    """Killed while writing the step-4 checkpoint, the step-2 one is still there (or the step-4 one, once
    exchanged); the same call resumes from it, to the losses of an uninterrupted run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: the same sums, so the same losses bit for bit
    try:
        full = train(model(train=True), DATA, CONFIG, quiet=True)
        run_killed(tmp_path, "train", tmp_path / "ck", point, call=2)  # the step-4 checkpoint
        assert hidden(tmp_path)
        first = []
        rest = train(model(seed=1, train=True), DATA, CONFIG, checkpoint_dir=tmp_path / "ck", quiet=True,
                     on_step=lambda done, seconds: first.append(done))
    finally:
        torch.set_num_threads(threads)
    assert first[0] == resumed_from + 1  # never from step 0
    assert [h["loss"] for h in rest] == [h["loss"] for h in full]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.py", "ck"]  # the next checkpoint cleaned up


def test_leftovers_of_a_live_writer_are_kept(tmp_path):
    """Only the leftovers of processes that are gone are removed: a concurrent writer's are its own."""
    mine = tmp_path / f".out{files._TMP}{os.getpid()}-x"
    mine.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    theirs = tmp_path / f".out{files._TMP}{gone.stdout.strip()}-y"
    theirs.mkdir()
    assert files.remove_leftovers(tmp_path / "out") == [theirs] and mine.is_dir()
