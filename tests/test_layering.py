"""One direction of dependency: the kernels import nothing of the package, and sampling with a
method never imports the training package. Each check runs in a fresh interpreter, so modules an
earlier test imported cannot hide an import."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _imported_after(code: str) -> set:
    """The ``duodiff_fast`` modules loaded in a fresh interpreter after running ``code``."""
    probe = code + "\nimport sys\nprint('\\n'.join(m for m in sys.modules if m.startswith('duodiff_fast')))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")})
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_sampling_methods_do_not_import_training():
    # the package imports every method's sampling module (ase, multistage, duodiff, adadiff, ...)
    loaded = _imported_after("import duodiff_fast.methods")
    assert {"duodiff_fast.methods.ase", "duodiff_fast.methods.multistage", "duodiff_fast.methods.duodiff",
            "duodiff_fast.methods.adadiff"} <= loaded
    training = sorted(m for m in loaded if m == "duodiff_fast.training" or m.startswith("duodiff_fast.training."))
    assert not training, f"importing duodiff_fast.methods imported the training package: {training}"


def test_training_parts_still_import_from_the_package():
    import duodiff_fast.methods as methods
    from duodiff_fast.methods import ase_training, multistage_training

    assert methods.ASEObjective is ase_training.ASEObjective and methods.finetune_ase is ase_training.finetune_ase
    assert methods.MultistageObjective is multistage_training.MultistageObjective
    with pytest.raises(AttributeError, match="no attribute 'Nonexistent'"):
        methods.Nonexistent  # noqa: B018


def test_kernels_import_nothing_of_the_package():
    pytest.importorskip("triton")
    source = (REPO / "kernels").glob("*.py")
    offenders = [p.name for p in source
                 if any(line.lstrip().startswith(("from duodiff_fast", "import duodiff_fast"))
                        for line in p.read_text().splitlines())]
    assert not offenders, f"kernels/ modules import the package: {offenders}"
    loaded = _imported_after("import torch, duodiff_fast.kernels as k; import duodiff_fast.kernels.final_layer")
    assert not any(m.startswith("duodiff_fast.models") for m in loaded), sorted(loaded)
