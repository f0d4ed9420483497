"""Workloads by name: built-ins, files and modules, and a one-sentence error for each way
a name can lead nowhere."""

import sys
import textwrap

import pytest

from precision_lab.errors import UsageError
from precision_lab.workloads.builtin import BUILTINS
from precision_lab.workloads.loader import WorkloadError, load_workload
from precision_lab.workloads.workload import Workload

WORKLOAD_FILE = textwrap.dedent(
    """
    import torch
    from precision_lab import Workload

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)

    def build():
        return Workload(lambda: torch.nn.Linear(3, 2), batches)

    ready = Workload(lambda: torch.nn.Linear(3, 2), batches, name="ready-made")
    number = 3

    def returns_text():
        return "not a workload"

    def raises():
        raise RuntimeError("no data here.\\nsecond line")
    """
)


@pytest.fixture
def workload_file(tmp_path):
    path = tmp_path / "my_workloads.py"
    path.write_text(WORKLOAD_FILE)
    return path


def test_builtins_are_workloads_named_as_themselves():
    assert set(BUILTINS) == {"mlp", "cnn", "resnet", "transformer", "lm"}
    for name in BUILTINS:
        workload = load_workload(name, 64)
        assert isinstance(workload, Workload) and workload.name == name
        inputs, targets = next(iter(workload.batches(0)))
        assert len(targets) == 64


def test_a_file_gives_a_workload_or_a_function_returning_one(workload_file):
    built = load_workload(f"{workload_file}:build", 64)
    assert isinstance(built, Workload) and built.name == "my_workloads:build"
    assert load_workload(f"{workload_file}:ready", 64).name == "ready-made"
    # Loaded once: every run of a suite trains the same workload object.
    assert load_workload(f"{workload_file}:build", 64) is built


def test_a_module_on_the_path_gives_a_workload(workload_file, monkeypatch):
    monkeypatch.syspath_prepend(str(workload_file.parent))
    monkeypatch.delitem(sys.modules, "my_workloads", raising=False)
    assert load_workload("my_workloads:build", 32).name == "my_workloads:build"


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        ("missing.py:build", "the file .*missing.py does not exist"),
        ("FILE:nothing", "has no attribute 'nothing'"),
        ("FILE:number", "is a int, not a precision_lab.Workload or a function returning one"),
        ("FILE:returns_text", "returned a str, not a precision_lab.Workload"),
        ("FILE:raises", "calling it raised RuntimeError: no data here\\.$"),
        ("FILE:", "is no import path"),
        ("no_such_package.sub:build", "no module named 'no_such_package'"),
        ("resnet50", "Unknown model 'resnet50'; expected a built-in \\(mlp, cnn, resnet"),
    ],
)
def test_each_bad_name_is_one_sentence(workload_file, suffix, message):
    name = suffix.replace("FILE", str(workload_file))
    if suffix.startswith("missing"):
        name = str(workload_file.parent / suffix)
    with pytest.raises(WorkloadError, match=message) as caught:
        load_workload(name, 64)
    assert isinstance(caught.value, UsageError)
    text = str(caught.value)
    assert "\n" not in text and text.endswith(".")


def test_a_file_that_fails_to_import_is_named(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import torch\nraise ValueError('bad config')\n")
    with pytest.raises(WorkloadError, match="importing .*broken.py raised ValueError: bad config"):
        load_workload(f"{path}:build", 64)
    assert not any(m.endswith("_broken") for m in sys.modules)


def test_a_name_with_a_slash_is_refused(tmp_path):
    path = tmp_path / "slashed.py"
    path.write_text(
        "import torch\nfrom precision_lab import Workload\n"
        "w = Workload(lambda: torch.nn.Linear(1, 1), lambda s: [], name='a/b')\n"
    )
    with pytest.raises(WorkloadError, match="without '/'"):
        load_workload(f"{path}:w", 64)
