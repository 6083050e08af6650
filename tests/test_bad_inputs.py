"""Every row of tests/bad_inputs.py ends in its error: the expected type, a message naming the input (and the
fix), one line and exit code 2 from the CLI, and nothing written or lost where the row says so."""

import dataclasses
import re

import pytest

from atq import QuantConfig
from atq.qat import TrainConfig

from .bad_inputs import ARTIFACT_FILES, BAD_KEYWORDS, BAD_TRAIN, ROWS, Case, CliExit, build_pristine


def _param(row):
    marks = []
    if row.pending:
        marks.append(pytest.mark.xfail(strict=True, reason=row.pending))
    if row.skip:
        marks.append(pytest.mark.skip(reason=row.skip))
    return pytest.param(row, id=row.name, marks=marks)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_pristine(tmp_path_factory.mktemp("pristine"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No row reaches the network: a hub id that does not exist fails the same way online and offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("row", [_param(row) for row in ROWS])
def test_bad_input_ends_in_a_clear_error(row, tmp_path, monkeypatch, pristine):
    case = Case(tmp_path, monkeypatch, pristine)
    with pytest.raises(row.error) as caught:
        row.run(case)
    message = str(caught.value)
    assert re.search(row.match, message, re.DOTALL), f"{row.name}: {message!r} does not match {row.match!r}"
    if row.cli:  # the error is one line, the last, and no traceback came before it
        assert "Traceback" not in caught.value.stderr, caught.value.stderr
    if row.after is not None:
        row.after(case)


def test_the_table_covers_what_it_promises(pristine):
    names = [row.name for row in ROWS]
    assert len(ROWS) >= 80 and len(set(names)) == len(names)
    assert set(BAD_KEYWORDS) == {keyword.name for keyword in QuantConfig.keywords()}  # every keyword a row
    assert set(BAD_TRAIN) == {f.name for f in dataclasses.fields(TrainConfig)}  # every field a row
    assert sorted(ARTIFACT_FILES) == sorted(p.name for p in (pristine / "artifact").iterdir())  # a flip in each
    assert all(row.error is CliExit for row in ROWS if row.cli)
