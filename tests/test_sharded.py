"""FSDP2 sharded QAT on CPU: two gloo processes, each holding half of every parameter, must train exactly as one
process does with the whole model (same global batch), and a sharded checkpoint must resume to the very losses
and weights of an uninterrupted run. The references are the unsharded loop (itself tested against one process
in test_qat.py) and the uninterrupted sharded run."""

import os

import pytest
import torch

from atq import QuantConfig
from atq.checkpoint import TRAIN_STATE, load_checkpoint
from atq.distributed import full_state_dict, shard
from atq.io import ArtifactError
from atq.qat import TrainConfig, prepare_qat, train
from atq.surgery import decoder_blocks

from .conftest import make_llama

CONFIG = TrainConfig(steps=4, batch_size=4, grad_accum=2, lr=1e-3, checkpoint_every=2)


def windows(n=12, seq=24):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(7))


def _student(sharded: bool):
    student = make_llama()
    prepare_qat(student, QuantConfig(group_size=32), learned_scales=True)
    if sharded:
        shard(student, decoder_blocks(student)[1])
    return student


def _worker(rank: int, world: int, directory: str, interrupt: bool) -> None:
    import torch.distributed as dist

    # A C++ abort (gloo's transport, a thread) leaves no Python traceback for mp.spawn to report: keep this
    # process's stderr in a file that _run shows when a worker dies.
    log = os.open(f"{directory}/stderr-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 2)
    os.close(log)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{directory}/rendezvous")
    try:
        torch.set_num_threads(1)
        teacher, student = make_llama(seed=1), _student(sharded=True)
        if interrupt:  # stop after one step (a checkpoint is written), then a fresh process state resumes it
            train(student, windows(), CONFIG, teacher=teacher, quiet=True, checkpoint_dir=f"{directory}/ckpt",
                  max_seconds=0)
            student = _student(sharded=True)
        history = train(student, windows(), CONFIG, teacher=teacher, quiet=True, checkpoint_dir=f"{directory}/ckpt")
        state = full_state_dict(student)
        if rank == 0:
            torch.save({"losses": [h["loss"] for h in history], "state": state}, f"{directory}/result.pt")
        dist.barrier()  # tear down together (atq.training.leave_distributed says why)
    finally:
        dist.destroy_process_group()


def _run(directory, interrupt: bool) -> dict:
    import torch.multiprocessing as mp

    directory.mkdir()
    # gloo binds to the address the hostname resolves to; a sandbox (CI) may resolve it to an interface that the
    # two processes cannot reach each other on. Both live on this machine: the loopback interface always works.
    with pytest.MonkeyPatch.context() as patch:
        if os.path.exists("/sys/class/net/lo"):  # Linux's name for it
            patch.setenv("GLOO_SOCKET_IFNAME", "lo")
        try:
            mp.spawn(_worker, args=(2, str(directory), interrupt), nprocs=2, join=True)
        except mp.ProcessExitedException as error:
            logs = {p.name: p.read_text()[-3000:] for p in sorted(directory.glob("stderr-*.log"))}
            raise AssertionError(f"a gloo worker died ({error}); its stderr: {logs}") from error
    return torch.load(directory / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharded")
    return {"straight": _run(base / "straight", False), "resumed": _run(base / "resumed", True), "dir": base}


def test_sharded_training_equals_one_process_with_the_whole_model(runs):
    single = _student(sharded=False)
    history = train(single, windows(), CONFIG, teacher=make_llama(seed=1), quiet=True)
    assert runs["straight"]["losses"] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    state = runs["straight"]["state"]
    assert set(state) == set(single.state_dict())
    for name, value in single.state_dict().items():
        assert torch.allclose(state[name], value, atol=1e-5), name


def test_sharded_checkpoint_resumes_to_the_uninterrupted_losses_and_weights(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert resumed["losses"] == straight["losses"]  # steps 2-4 trained after the resume, step 1 from its log
    for name, value in straight["state"].items():
        assert torch.equal(resumed["state"][name], value), name


def test_sharded_checkpoint_is_refused_by_an_unsharded_model(runs):
    directory = runs["dir"] / "straight" / "ckpt"
    assert (directory / TRAIN_STATE).is_file() and any(directory.glob("*.distcp"))
    student = _student(sharded=False)
    with pytest.raises(ArtifactError, match="sharded run over 2 processes.*with --shard"):
        load_checkpoint(directory, student, torch.optim.AdamW(student.parameters()))
