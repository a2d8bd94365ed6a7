import os
import warnings
from types import SimpleNamespace

import pytest
import torch

# one intra-op thread per test process: pytest -n 2 on two cores would otherwise oversubscribe them
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torch.distributed._tools.*")


@pytest.fixture
def caff(capsys):
    """Run the CLI in this process; returns (returncode, stdout, stderr) like a subprocess would."""
    from caff.cli import main

    def run(*args):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run
